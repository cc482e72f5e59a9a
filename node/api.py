"""The HTTP API of one node (JSON). Routes validate, build commands, await the durable
commit, and answer with tokens: ``ETag`` on every entity, ``X-Consistency-Token`` on
every response; a read carrying ``X-Consistency-Token`` first waits for the node to
catch up with it (up to ``X-Wait-Ms``), and answers 504 if it does not.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from aiohttp import hdrs, web
from multidict import istr

from crdt.clock import make_stamp
from node import commands
from node.audit import iso_of
from node.config import Settings
from node.deadlines import read_body, request_began
from node.events import ENTITY_ID_RE, Event, stream_of
from node.fold import Bounded, EntityState, decode_state
from node.http_errors import BODY_BYTES_MAX, Handler, as_json_error, fail
from node.kv import StorageFailed
from node.metrics import render_metrics
from node.openapi import OPENAPI
from node.replica import At, Replica
from node.schema import index_value, parse_fields, render
from node.tokens import BadToken, Token, decode_token, encode_token, etag_of
from node.views import ID_CONFLICT
from node.writer import Failing

REPLICA = web.AppKey("replica", Replica)
SETTINGS = web.AppKey("settings", Settings)
STARTED = web.AppKey("started", float)
ACTOR_CHARS_MAX = 128
PAGE_ITEMS_DEFAULT = 50
OPEN_PATHS = ("/health",)
# Header names as multidict's case-insensitive strings, made once (as aiohttp's ``hdrs``
# are): a plain str is folded anew each time one is looked up or set, on every request.
TOKEN_HEADER = istr("X-Consistency-Token")
ACTOR_HEADER = istr("X-Actor")
MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _json(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return _json_bytes(json.dumps(data).encode(), status=status, headers=headers)


def _json_bytes(
    body: bytes, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _replica(request: web.Request) -> Replica:
    return request.app[REPLICA]


def _settings(request: web.Request) -> Settings:
    return request.app[SETTINGS]


# -- the guard around every route --------------------------------------------------


def _authenticate(request: web.Request, token: str) -> None:
    if request.path not in OPEN_PATHS and not request.path.startswith("/replication/"):
        scheme, _, given = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        # The scheme is case-insensitive (RFC 7235). Bytes that are not UTF-8 arrive as
        # lone surrogates: encode them back, never raise.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(errors="surrogateescape"), token.encode()
        ):
            fail(401, "unauthorized", "send Authorization: Bearer <api token>")


OPS_PATHS = ("/health", "/status", "/metrics", "/openapi.json")


def _check_ready(request: web.Request, why: str) -> None:
    """While the node cannot serve clients yet (bootstrapping), say so and why."""
    if request.path not in OPS_PATHS and not request.path.startswith("/replication/"):
        fail(503, "not_ready", f"this node is not serving clients yet: {why}; see /status")


async def _catch_up(request: web.Request, replica: Replica, settings: Settings) -> None:
    """Before a read, wait until this node has seen what the client's token covers."""
    given = request.headers.get(TOKEN_HEADER)
    if given is not None and request.method in ("GET", "HEAD"):
        try:
            wanted = decode_token(given)
        except BadToken as e:
            fail(400, "bad_token", str(e))
        await _wait_for_token(request, replica, settings, wanted)


async def _wait_for_token(
    request: web.Request, replica: Replica, settings: Settings, wanted: Token
) -> None:
    """Wait until this node has seen what ``wanted`` covers, up to ``X-Wait-Ms``; else
    answer 504 (503 if the node stops meanwhile)."""
    wait_ms = _int_header(request, "X-Wait-Ms", settings.consistency_wait_ms_default)
    if wait_ms > settings.consistency_wait_ms_max:
        fail(400, "bad_header", f"X-Wait-Ms is at most {settings.consistency_wait_ms_max}")
    if not await replica.wait_for_token(wanted, wait_ms / 1000):
        if replica.stopping:
            fail(503, "stopping", STOPPING_MESSAGE, token=replica.token_text())
        fail(
            504,
            "not_caught_up",
            f"this node has not seen that token's writes after {wait_ms} ms",
            token=replica.token_text(),
        )


STOPPING_MESSAGE = "this node is stopping; ask another region, or this one once it is back"


Guard = Callable[[Handler], Handler]
GUARD: web.AppKey[Guard] = web.AppKey("guard")  # how an extension wraps the routes it adds
UNMATCHED = "unmatched"  # the name of the route answering what no other route matches


def guard(replica: Replica, settings: Settings) -> Guard:
    """What wraps every route's handler: authentication, then readiness, then the
    consistency wait, before it; every failure as a JSON error; and every answer,
    errors included, carrying the node's token unless a write set its own.

    A wrapper per route rather than an aiohttp middleware, which costs a chain of calls
    on every request; a catch-all route (``unmatched``) answers, as JSON too, what no
    route matches. It holds the replica and settings: nothing is looked up per request.
    """
    token = settings.api_token

    def guarded(handler: Handler) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            request_began(request)
            try:
                if token is not None:
                    _authenticate(request, token)
                if replica.not_ready is not None:
                    _check_ready(request, replica.not_ready)
                if TOKEN_HEADER in request.headers:
                    await _catch_up(request, replica, settings)
                response = await handler(request)
            except Exception as exc:  # as_json_error answers each kind (or raises a redirect)
                if isinstance(exc, StorageFailed) and exc.fatal:
                    replica.storage_gave_up.set()  # a read met it first: the node stops
                response = as_json_error(request, exc)
            if TOKEN_HEADER not in response.headers:
                response.headers[TOKEN_HEADER] = replica.token_text()
            return response

        return handle

    return guarded


async def unmatched(request: web.Request) -> web.StreamResponse:
    """No route takes this request: 405 with ``Allow`` if its path has routes, else 404.

    The catch-all route is tried last whenever it was added: aiohttp resolves a path
    from its longest prefix, and this one's is ``/``."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.name != UNMATCHED:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def _int_header(request: web.Request, name: str, default: int) -> int:
    raw = request.headers.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:  # int() refuses "²"
        fail(400, "bad_header", f"{name} must be a whole number of milliseconds")
    return int(raw)


def _int_query(request: web.Request, name: str, default: int, maximum: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:  # int() refuses "²"
        fail(400, "bad_query", f"{name} must be a whole number")
    value = int(raw)
    if not 0 <= value <= maximum:
        fail(400, "bad_query", f"{name} must be between 0 and {maximum}")
    return value


def _limit(request: web.Request) -> int:
    maximum = _settings(request).page_items_max
    limit = _int_query(request, "limit", min(PAGE_ITEMS_DEFAULT, maximum), maximum)
    if limit < 1:
        fail(400, "bad_query", "limit must be at least 1")
    return limit


def _cursor(request: web.Request) -> str:
    cursor = request.query.get("cursor", "")
    if cursor and not ENTITY_ID_RE.fullmatch(cursor):
        fail(400, "bad_query", "not a cursor from this API")
    return cursor


SEARCH_CURSOR_CHARS_MAX = 200  # a search index key, base64url: at most 64 + 1 + 64 bytes
# A conflict's key, base64url: its field, and a value of at most 254 characters (1,016
# bytes of UTF-8) or an id's stream.
CONFLICTS_CURSOR_CHARS_MAX = 1_400


def _search_cursor(request: web.Request) -> bytes:
    """A search's cursor: the index key its last page ended at, base64url (opaque)."""
    return _key_cursor(request, "this search", SEARCH_CURSOR_CHARS_MAX)


def _key_cursor(request: web.Request, what: str, chars_max: int) -> bytes:
    """A cursor that is the key a page ended at, base64url (opaque); b"" for the first."""
    cursor = request.query.get("cursor", "")
    if not cursor:
        return b""
    try:
        if len(cursor) > chars_max:
            raise ValueError(cursor)
        key = base64.urlsafe_b64decode(cursor.encode() + b"=" * (-len(cursor) % 4))
    except ValueError:  # binascii.Error too
        fail(400, "bad_query", f"not a cursor from {what}")
    if b"\0" not in key:
        fail(400, "bad_query", f"not a cursor from {what}")
    return key


def _key_cursor_of(key: bytes | None) -> str | None:
    return None if key is None else base64.urlsafe_b64encode(key).decode().rstrip("=")


async def _body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        fail(415, "unsupported_media_type", "send Content-Type: application/json")
    # larger than body_bytes_max: aiohttp answers 413; slower than its wait: 408
    settings = _settings(request)
    raw = await read_body(request, settings.request_body_wait_ms, settings.body_bytes_max)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        fail(400, "bad_json", f"the body is not JSON: {e}")
    # JSON may carry a lone surrogate, escaped ("\ud800"), as its UTF-8 bytes (json
    # decodes them) or in UTF-16/32 (whose ASCII has NUL bytes): not text, it cannot be
    # stored. Only a body that may hold one is checked whole.
    if MAYBE_SURROGATE.search(raw) or b"\0" in raw:
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except (UnicodeEncodeError, RecursionError):
            fail(400, "bad_json", "the body has a lone surrogate escape such as \\ud800")
    return body


def _actor(request: web.Request) -> str:
    actor = request.headers.get(ACTOR_HEADER, "api")
    if len(actor) > ACTOR_CHARS_MAX:
        fail(400, "bad_header", f"X-Actor is at most {ACTOR_CHARS_MAX} characters")
    try:  # bytes that are not UTF-8 arrive as lone surrogates, which cannot be stored
        actor.encode()
    except UnicodeEncodeError:
        fail(400, "bad_header", "X-Actor must be UTF-8 text")
    return actor


def _write_token(replica: Replica, written: list[Event]) -> dict[str, str]:
    """The token a write answers with: it covers the events the write made."""
    if not written:
        return {TOKEN_HEADER: replica.token_text()}
    last = written[-1].dot  # its origin, not the id read now: a commit may have renewed it
    return {TOKEN_HEADER: encode_token({last.origin: last.counter})}


# -- entities ---------------------------------------------------------------------


def _entity_json(kind: str, entity_id: str, state: EntityState) -> dict[str, Any]:
    out = render(kind, entity_id, state.values())
    created = state.created_hlc
    out["created_at"] = iso_of(created) if created else None
    out["updated_at"] = iso_of(state.updated_hlc)
    return out


def _entity_body(kind: str, entity_id: str, state: EntityState) -> bytes:
    """The entity's JSON, rendered once per state: a state is immutable, and the decoded
    views keep a hot entity's state, so its next reads send the same bytes."""
    key = ("api_body", stream_of(kind, entity_id))
    try:
        body: bytes = state.derived[key]
    except KeyError:
        body = state.derived[key] = json.dumps(_entity_json(kind, entity_id, state)).encode()
    return body


def _entity_response(
    kind: str,
    entity_id: str,
    state: EntityState,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return _json_bytes(
        _entity_body(kind, entity_id, state),
        status=status,
        headers={hdrs.ETAG: _etag(state), **(headers or {})},
    )


# An existing entity's ETag and JSON, by its stream, with the stored view's bytes they
# were rendered from and the writer's generation (``Writer.generation``) read before
# those bytes were. An entry is current while the generation is that one (no commit
# since: a GET by id answers from it without reading LMDB at all), or if its bytes equal
# the view read now (then it takes the generation read before that read). A GET by id of
# a hot entity reads one tuple, not the state, its existence set and what is kept with
# it: in a serving process, where much of what a request touches is out of the CPU's
# caches, that was about a fifth of a GET's time (18.8-19.7k against 23.9k req/s under
# wrk), and the read transaction and the comparison of the view's bytes another tenth.
# Keyed by the stream, whose hash costs a fraction of the view's. Generations are unique
# in the process, so an entry of one replica is never current for another.
RENDERED_ENTITIES_MAX = 8_192
RENDERED_BYTES_MAX = 64 * 1024 * 1024  # of view bytes and JSON bodies kept
Rendered = tuple[bytes, str, bytes, int]  # view bytes, ETag, JSON body, generation


def _rendered_bytes(stream: str, rendered: Rendered) -> int:
    return len(rendered[0]) + len(rendered[2])


_RENDERED = Bounded[str, Rendered](
    RENDERED_ENTITIES_MAX, bytes_max=RENDERED_BYTES_MAX, weigh=_rendered_bytes
)


def _rendered(kind: str, entity_id: str, raw: bytes | None, generation: int) -> tuple[str, bytes]:
    """The ETag and JSON body of the entity whose stored view is ``raw``, or a 404 if it
    does not exist."""
    rendered = _rendered_view(kind, entity_id, raw, generation)
    if rendered is None:
        fail(404, "not_found", f"no {kind} {entity_id!r}")
    return rendered


def _rendered_view(
    kind: str, entity_id: str, raw: bytes | None, generation: int
) -> tuple[str, bytes] | None:
    """The ETag and JSON body of the entity whose stored view is ``raw``, None if it does
    not exist; decoded and rendered only when the view is not in ``_RENDERED``.
    ``generation``: the writer's, read before ``raw`` was."""
    if raw is None:
        return None  # never stored: no such entity
    stream = stream_of(kind, entity_id)
    hit = _RENDERED.get(stream)
    if hit is not None and hit[0] == raw:
        if hit[3] != generation:
            _RENDERED.put(stream, (raw, hit[1], hit[2], generation))
        return hit[1], hit[2]
    state = decode_state(raw)
    if not state.exists:
        return None
    etag, body = _etag(state), _entity_body(kind, entity_id, state)
    _RENDERED.put(stream, (raw, etag, body, generation))
    return etag, body


def _etag(state: EntityState) -> str:
    try:
        etag: str = state.derived[("api_etag", "")]
    except KeyError:
        etag = state.derived[("api_etag", "")] = etag_of(state.etag)
    return etag


def _id(request: web.Request, name: str = "id") -> str:
    entity_id = request.match_info[name]
    if not ENTITY_ID_RE.fullmatch(entity_id):  # as schema.check_id, here a path that is no id
        fail(404, "not_found", f"no such {name}")
    return entity_id


def _existing(replica: Replica, kind: str, entity_id: str) -> EntityState:
    state = replica.entity(kind, entity_id)
    if not state.exists:
        fail(404, "not_found", f"no {kind} {entity_id!r}")
    return state


def _parse_at(raw: str) -> At:
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        try:
            return At(token=decode_token(raw))
        except BadToken:
            fail(400, "bad_query", "at must be an ISO-8601 time or a consistency token")
    if moment.tzinfo is None:
        fail(400, "bad_query", "at needs a time zone, e.g. 2026-01-01T12:00:00Z")
    return At.time_ms(max(0, int(moment.timestamp() * 1000)))  # before 1970: before all


async def _entity_at(
    request: web.Request, replica: Replica, kind: str, entity_id: str
) -> web.Response:
    """The entity as of ``?at=``. A token's cut is answered only once this node has
    seen all of it (waiting as for ``X-Consistency-Token``, else 504): a cut it has not
    seen would be another state on each node that answered it."""
    raw = request.query["at"]
    at = _parse_at(raw)
    if at.token is not None:
        await _wait_for_token(request, replica, request.app[SETTINGS], at.token)
    state = await replica.entity_at(kind, entity_id, at)
    if state is None or not state.exists:
        fail(404, "not_found", f"no {kind} {entity_id!r} at that time")
    then = {**_entity_json(kind, entity_id, state), "as_of": raw}
    return _json(then, headers={hdrs.ETAG: etag_of(state.etag)})


def create_handler(kind: str, replica: Replica) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        requested_id, writes = parse_fields(kind, await _body(request), creating=True)
        entity_id = requested_id or _new_id()
        written = await replica.write(
            commands.create(kind, entity_id, writes), actor=_actor(request)
        )
        state = replica.entity(kind, entity_id)
        headers = {"Location": f"/{kind}s/{entity_id}", **_write_token(replica, written)}
        return _entity_response(kind, entity_id, state, status=201, headers=headers)

    return handle


def _new_id() -> str:
    return uuid.uuid4().hex


def get_handler(kind: str, replica: Replica) -> Handler:
    # The hottest route: what its requests call is bound here, once. In a serving
    # process each Python call a request makes shows in its time (a GET by id made 14:
    # 49-54 against 59-60 us of CPU a request under wrk, with 5,000 users).
    prefix = stream_of(kind, "")
    read_view = replica.kv.getter("views")  # by the stream's bytes, as views.stored_view
    rendered = _RENDERED.get
    writer = replica.writer

    async def handle(request: web.Request) -> web.Response:
        entity_id = request.match_info["id"]
        if not ENTITY_ID_RE.fullmatch(entity_id):  # _id, without its call
            fail(404, "not_found", "no such id")
        if request.query_string and "at" in request.query:
            return await _entity_at(request, replica, kind, entity_id)
        stream = prefix + entity_id
        generation = writer.generation  # before anything is read
        hit = rendered(stream)
        if generation and hit is not None and hit[3] == generation:  # no commit since
            etag, body = hit[1], hit[2]
        else:
            raw = read_view(stream.encode())
            etag, body = _rendered(kind, entity_id, raw, generation)
        if_none_match = request.headers.get(hdrs.IF_NONE_MATCH)
        if if_none_match is not None and (etag in if_none_match or if_none_match.strip() == "*"):
            return web.Response(status=304, headers={hdrs.ETAG: etag})
        return web.Response(body=body, content_type="application/json", headers={hdrs.ETAG: etag})

    return handle


def patch_handler(kind: str, replica: Replica) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        entity_id = _id(request)
        _, writes = parse_fields(kind, await _body(request), creating=False)
        decide = commands.patch(kind, entity_id, writes, request.headers.get(hdrs.IF_MATCH))
        written = await replica.write(decide, actor=_actor(request))
        state = replica.entity(kind, entity_id)
        return _entity_response(kind, entity_id, state, headers=_write_token(replica, written))

    return handle


def delete_handler(kind: str, replica: Replica) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        entity_id = _id(request)
        if_match = request.headers.get(hdrs.IF_MATCH)
        if kind == "group":  # its members' removes a commit at a time
            written = await replica.delete_group(entity_id, if_match, actor=_actor(request))
        else:
            decide = commands.delete(kind, entity_id, if_match)
            written = await replica.write(decide, actor=_actor(request))
        return web.Response(status=204, headers=_write_token(replica, written))

    return handle


def history_handler(kind: str) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        entity_id = _id(request)
        limit, after = _limit(request), _seq_cursor(request)
        # Whether each write won is a matter of all of them; a page lists some.
        trail = await _replica(request).trail(kind, entity_id)
        if trail is None:
            fail(404, "not_found", f"no {kind} {entity_id!r} has ever existed here")
        page, cursor = trail.page(after, limit)
        next_cursor = None if cursor is None else str(cursor)
        return _json({"id": entity_id, "kind": kind, "events": page, "next_cursor": next_cursor})

    return handle


def _seq_cursor(request: web.Request) -> int:
    """A cursor that is a seq of this node's log (a history's), or 0 for the first page."""
    raw = request.query.get("cursor", "") or "0"
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
        fail(400, "bad_query", "not a cursor from this history")
    return int(raw)


def list_users_handler(replica: Replica) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        params = request.query
        generation = replica.writer.generation  # before anything is read
        for field in ("email", "username"):  # a unique field: one page, no cursor
            value = params.get(field)
            if value is not None:
                # limit and cursor are ignored here, but refused if malformed
                if "limit" in params or "cursor" in params:
                    _limit(request)
                    _cursor(request)
                return _looked_up(replica, field, value, generation)
        limit = _limit(request)
        cursor: str | None
        if "q" in params:
            query = params["q"]
            if len(query) > 200:
                fail(400, "bad_query", "q is at most 200 characters")
            ids, key = replica.search(query, after=_search_cursor(request), limit=limit)
            cursor = None if key is None else base64.urlsafe_b64encode(key).decode().rstrip("=")
        else:
            ids, cursor = replica.entity_ids("user", after=_cursor(request), limit=limit)
        views = zip(ids, replica.entity_views("user", ids), strict=True)
        return _users_page(_user_bodies(views, generation), cursor)

    return handle


# A lookup by a unique field's page, by the field and the value asked for, with the
# writer's generation read before it was read: while no commit has happened since, the
# same lookup answers it without reading LMDB (an email's holders, then their views).
# Only values an email or a username can be, and pages of at most a few users (a page of
# users with large profiles is read each time): at most 4,096 x 8 KiB kept. A node taking
# writes starts a generation with every commit, and reads the index and the views again.
LOOKUPS_MAX = 4_096
LOOKUP_VALUE_CHARS_MAX = 254
LOOKUP_PAGE_BYTES_MAX = 8_192
_LOOKUPS = Bounded[str, tuple[int, bytes]](LOOKUPS_MAX)  # by "field\0value"


def _looked_up(replica: Replica, field: str, value: str, generation: int) -> web.Response:
    """The page of users holding ``value`` in the unique ``field``."""
    key = field + "\0" + index_value(field, value)  # as the index: case does not matter
    hit = _LOOKUPS.get(key)
    if generation and hit is not None and hit[0] == generation:
        return web.Response(body=hit[1], content_type="application/json")
    page = _page_body(_user_bodies(replica.look_up_views(field, value), generation), None)
    if len(value) <= LOOKUP_VALUE_CHARS_MAX and len(page) <= LOOKUP_PAGE_BYTES_MAX:
        _LOOKUPS.put(key, (generation, page))
    return web.Response(body=page, content_type="application/json")


def _user_bodies(views: Iterable[tuple[str, bytes | None]], generation: int) -> list[bytes]:
    """The JSON of each user that exists, from its id and stored view (read after the
    writer's ``generation`` was)."""
    bodies = []
    for user_id, raw in views:
        rendered = _rendered_view("user", user_id, raw, generation)
        if rendered is not None:
            bodies.append(rendered[1])
    return bodies


def _users_page(bodies: list[bytes], cursor: str | None) -> web.Response:
    return web.Response(body=_page_body(bodies, cursor), content_type="application/json")


def _page_body(bodies: list[bytes], cursor: str | None) -> bytes:
    """``{"users": [...], "next_cursor": ...}``, joined from each user's rendered JSON."""
    users = b", ".join(bodies)
    tail = b"null" if cursor is None else json.dumps(cursor).encode()
    return b'{"users": [' + users + b'], "next_cursor": ' + tail + b"}"


async def user_groups(request: web.Request) -> web.Response:
    user_id = _id(request)
    replica = _replica(request)
    _existing(replica, "user", user_id)
    return _json({"user": user_id, "groups": replica.groups_of(user_id)})


async def group_members(request: web.Request) -> web.Response:
    group_id = _id(request)
    replica = _replica(request)
    _existing(replica, "group", group_id)
    limit = _limit(request)
    ids, cursor = replica.members_page(group_id, after=_cursor(request), limit=limit)
    return _json({"group": group_id, "members": ids, "next_cursor": cursor})


async def put_member(request: web.Request) -> web.Response:
    group_id, user_id = _id(request), _id(request, "user_id")
    replica = _replica(request)
    written = await replica.write(commands.add_member(group_id, user_id), actor=_actor(request))
    return _json(
        {"group": group_id, "user": user_id, "member": True}, headers=_write_token(replica, written)
    )


async def delete_member(request: web.Request) -> web.Response:
    group_id, user_id = _id(request), _id(request, "user_id")
    replica = _replica(request)
    written = await replica.write(commands.remove_member(group_id, user_id), actor=_actor(request))
    return web.Response(status=204, headers=_write_token(replica, written))


# -- feed and operations ----------------------------------------------------------


def event_json(seq: int, event: Event) -> dict[str, Any]:
    return {
        "seq": seq,
        "dot": str(event.dot),
        "origin": event.dot.origin,
        "hlc": event.hlc,
        "time": iso_of(event.hlc),
        "stream": event.stream,
        "op": event.op.name.lower(),
        "field": event.field,
        "value": event.value,
        "observed": sorted(str(d) for d in event.observed),
        "actor": event.actor,
    }


async def changes(request: web.Request) -> web.Response:
    replica, settings = _replica(request), _settings(request)
    raw = request.query.get("since", "0")
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
        fail(400, "bad_query", "since must be a cursor from this feed")
    since = int(raw)
    limit = _limit(request)
    wait_ms = _int_query(request, "wait", 0, settings.changes_wait_ms_max)
    if wait_ms:
        await replica.wait_until(lambda: replica.state.seq > since, wait_ms / 1000)
    found = replica.changes(since, limit=limit)
    next_cursor = found[-1][0] if found else max(since, 0)
    return _json({"changes": [event_json(s, e) for s, e in found], "next_cursor": str(next_cursor)})


async def conflicts(request: web.Request) -> web.Response:
    found: list[dict[str, Any]] = []
    page, last = _replica(request).conflicts_page(
        after=_key_cursor(request, "this list of conflicts", CONFLICTS_CURSOR_CHARS_MAX),
        limit=_limit(request),
    )
    for field, value, held in page:
        if field == ID_CONFLICT:  # value: the stream; held: its concurrent creates' dots
            kind, _, entity_id = value.partition("/")
            found.append(
                {
                    "field": field,
                    "kind": kind,
                    "value": entity_id,
                    "ids": [entity_id],
                    "creates": held,
                }
            )
        else:
            found.append({"field": field, "value": value, "ids": held})
    return _json({"conflicts": found, "next_cursor": _key_cursor_of(last)})


async def health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def status(request: web.Request) -> web.Response:
    replica, settings = _replica(request), _settings(request)
    state = replica.state
    return _json(
        {
            "region": replica.identity.region,
            "replica_id": state.replica_id,  # of the same commit as the rest
            "seq": state.seq,
            "summary": {
                origin: {"contiguous": seen.contiguous, "beyond_gap": len(seen.cloud)}
                for origin, seen in sorted(state.summary.origins.items())
            },
            "token": replica.token_text(),
            "digest": replica.digest(),
            "peers": [{"name": p.name, "url": p.url} for p in settings.peers],
            "serving": replica.not_ready is None,
            "not_ready": replica.not_ready,
            "writes_held": replica.writes_held,
            "writes_failing": _failing(replica.writer.storage_failing()),
            "writer": {
                "queued": replica.writer.queued,
                "commits": replica.writer.commits,
                "requests": replica.writer.requests,
            },
            "uptime_s": round(time.monotonic() - request.app[STARTED], 3),
        }
        | {k: v for report in replica.reporters for k, v in report().items()}
    )


def _failing(failing: Failing | None) -> dict[str, Any] | None:
    """What ``/status`` says of commits the storage refuses (None: the last went through)."""
    if failing is None:
        return None
    return {
        "error": failing.error,
        "full": failing.full,
        "since": iso_of(make_stamp(int(failing.since_s * 1000))),
        "commits": failing.commits,
        "requests": failing.requests,
    }


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        text=render_metrics(_replica(request)),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Prometheus-Format": "0.0.4"},
    )


async def openapi(request: web.Request) -> web.Response:
    return _json(OPENAPI)


def build_app(replica: Replica, settings: Settings) -> web.Application:
    app = web.Application(client_max_size=settings.body_bytes_max)
    guarded = app[GUARD] = guard(replica, settings)
    app[REPLICA] = replica
    app[SETTINGS] = settings
    app[BODY_BYTES_MAX] = settings.body_bytes_max
    app[STARTED] = time.monotonic()
    routes: list[tuple[str, str, Callable[[web.Request], Any]]] = []
    for kind in ("user", "group"):
        base = f"/{kind}s"
        routes += [
            ("POST", base, create_handler(kind, replica)),
            *([("GET", "/users", list_users_handler(replica))] if kind == "user" else []),
            ("GET", base + "/{id}", get_handler(kind, replica)),
            ("PATCH", base + "/{id}", patch_handler(kind, replica)),
            ("DELETE", base + "/{id}", delete_handler(kind, replica)),
            ("GET", base + "/{id}/history", history_handler(kind)),
        ]
    routes += [
        ("GET", "/users/{id}/groups", user_groups),
        ("GET", "/groups/{id}/members", group_members),
        ("PUT", "/groups/{id}/members/{user_id}", put_member),
        ("DELETE", "/groups/{id}/members/{user_id}", delete_member),
        ("GET", "/changes", changes),
        ("GET", "/conflicts", conflicts),
        ("GET", "/health", health),
        ("GET", "/status", status),
        ("GET", "/metrics", metrics),
        ("GET", "/openapi.json", openapi),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, guarded(handler))
        if method == "GET":  # the same answer without its body (load balancers' checks)
            app.router.add_route("HEAD", path, guarded(handler))
    # Every path, a newline in it too (``.`` alone stops at one: aiohttp's plain-text 404).
    app.router.add_route("*", "/{path:[\\s\\S]*}", guarded(unmatched), name=UNMATCHED)
    return app
