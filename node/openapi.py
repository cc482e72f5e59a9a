"""The OpenAPI 3 description of the HTTP API, served at ``/openapi.json``.

Plain data, built with small helpers. Value rules come from ``node.schema`` and
``node.events`` so the document cannot drift from what the server enforces; tests
check that every route ``build_app`` registers is described here (and no other),
and that real requests and answers validate against these schemas.
"""

from __future__ import annotations

import re
from typing import Any

from node import schema as rules
from node.events import ACTOR_CHARS_MAX, ENTITY_ID_RE
from node.tokens import TOKEN_CHARS_MAX

Json = dict[str, Any]

ERRORS = {
    400: "Bad request: bad JSON, wrong type, unknown field, bad query value or header.",
    401: "No valid `Authorization: Bearer <api token>` (when the node has an API token).",
    404: "No such entity (an id that cannot exist is not found either).",
    405: "The path does not allow this method (any path; see `Allow`).",
    409: "Conflict in this region: the id exists, or the username or email is taken.",
    412: "If-Match does not match the current ETag; nothing was written.",
    413: "The body is larger than the node's limit (1 MiB by default).",
    415: "The body is not sent as `Content-Type: application/json`.",
    422: "A well-formed value breaks a rule (e.g. not an email address, missing field).",
    503: "`not_ready`: not serving clients yet (see /status); `overloaded`: the write queue "
    "is full; `storage_failed`: the storage refused the commit (an I/O error), nothing "
    "written. Retry after `Retry-After` seconds. `stopping`: the node is stopping (a read's "
    "consistency wait ended by it).",
    504: "This node has not seen the X-Consistency-Token's writes within X-Wait-Ms.",
    507: "`storage_full`: the storage is full (no space, a quota, a file size limit); "
    "nothing written, retry after `Retry-After` seconds (see `writes_failing` in /status).",
}


# -- schema helpers ------------------------------------------------------------------


def ref(name: str, kind: str = "schemas") -> Json:
    return {"$ref": f"#/components/{kind}/{name}"}


def string(pattern: str | None = None, **more: Any) -> Json:
    return {"type": "string", **({} if pattern is None else {"pattern": pattern}), **more}


def whole(regex: re.Pattern[str]) -> str:
    """A Python regex the server applies with ``fullmatch``, as an ECMA-262 pattern."""
    return f"^{regex.pattern}$"


def integer(**more: Any) -> Json:
    return {"type": "integer", **more}


def array(items: Json) -> Json:
    return {"type": "array", "items": items}


def nullable(schema: Json) -> Json:
    return {**schema, "nullable": True}


def obj(props: Json, required: tuple[str, ...] | None = None, **more: Any) -> Json:
    """A closed object; every property is required unless ``required`` names some."""
    needed = list(props) if required is None else list(required)
    out: Json = {"type": "object", "properties": props, "additionalProperties": False}
    return {**out, **({"required": needed} if needed else {}), **more}


def map_of(values: Json, **more: Any) -> Json:
    return {"type": "object", "additionalProperties": values, **more}


ID = string(whole(ENTITY_ID_RE), maxLength=64)
TIME = string(format="date-time")
TEXT = string(r"\S", minLength=1, maxLength=rules.NAME_CHARS_MAX)  # \S: not blank
PROFILE_VALUE = nullable(string(r"\S", maxLength=rules.PROFILE_VALUE_CHARS_MAX))
PROFILE_WRITE = map_of(
    PROFILE_VALUE,
    maxProperties=rules.PROFILE_KEYS_PER_WRITE_MAX,
    description=f"Keys match `{whole(rules.PROFILE_KEY_RE)}`. Each key given is set, or "
    "unset by null; keys not given are left alone.",
)
USER_FIELDS: Json = {
    "name": TEXT,
    "username": string(whole(rules.USERNAME_RE), maxLength=64),
    "email": string(whole(rules.EMAIL_RE), maxLength=rules.EMAIL_CHARS_MAX),
    "api_key": string(whole(rules.API_KEY_RE), maxLength=128),
}
STAMPS: Json = {
    "created_at": nullable(TIME),
    "updated_at": TIME,
    "as_of": string(description="Only with `?at=`: the `at` asked for."),
}
AS_SEEN = ("id", "created_at", "updated_at")
CHANGE_ONE = "At least one field or profile key to change (else 422 `empty_patch`)."
EVENT: Json = {
    "seq": integer(description="Local sequence number on this node (arrival order)."),
    "dot": string(description="The event's identity: `<origin>:<counter>`."),
    "origin": string(description="Replica id that wrote it: `<region>~<incarnation>`."),
    "hlc": integer(description="Hybrid logical clock stamp: `ms << 16 | logical`."),
    "time": TIME,
    "actor": string(description="Who wrote it: the writer's X-Actor header, `api` if none."),
    "op": string(enum=["create", "delete", "set", "add", "remove"]),
}

CONFLICT = obj(
    {
        "field": string(enum=["email", "username", "id"]),
        "value": string(description="The value claimed; for `id`, the id created twice."),
        "ids": array(ID),
        "kind": string(enum=["user", "group"], description="`id`: the entity's kind."),
        "creates": {**array(string()), "description": "`id`: its concurrent creates (dots)."},
    },
    required=("field", "value", "ids"),
)

SCHEMAS: Json = {
    "Error": obj(
        {
            "error": string(description="Machine-readable code, e.g. `conflict`."),
            "message": string(description="For people."),
            "field": string(description="400/409/422: the field at fault."),
            "held_by": string(description="409: the user holding the value."),
            "etag": string(description="412: the entity's current ETag."),
            "token": string(description="504: this node's consistency token."),
        },
        ("error", "message"),
        additionalProperties=True,
    ),
    "UserCreate": obj({"id": ID, **USER_FIELDS, "profile": PROFILE_WRITE}, rules.USER_REQUIRED),
    "UserPatch": obj(
        {**USER_FIELDS, "profile": PROFILE_WRITE}, (), minProperties=1, description=CHANGE_ONE
    ),
    "GroupCreate": obj({"id": ID, "name": TEXT}, rules.GROUP_REQUIRED),
    "GroupPatch": obj({"name": TEXT}),
    "User": obj(
        {"id": ID, **USER_FIELDS, "profile": map_of(string()), **STAMPS},
        (*AS_SEEN, "profile"),
        description="`name`, `username` and `email` are there for every user created "
        "here; a user whose events are still arriving from a peer may lack some.",
    ),
    "Group": obj({"id": ID, "name": string(), **STAMPS}, AS_SEEN),
    # An id, or with ``q`` the search's own cursor (base64url of an index key).
    "UserList": obj(
        {"users": array(ref("User")), "next_cursor": nullable(string("^[A-Za-z0-9_-]{1,200}$"))}
    ),
    "UserGroups": obj({"user": ID, "groups": array(ID)}),
    "MemberList": obj({"group": ID, "members": array(ID), "next_cursor": nullable(ID)}),
    "Membership": obj({"group": ID, "user": ID, "member": {"type": "boolean", "enum": [True]}}),
    "HistoryEvent": obj(
        {
            **EVENT,
            "field": string(description="set/add/remove: the field."),
            "value": nullable(string(description="set: the value (null unsets); add/remove: id")),
            "won": {"type": "boolean", "description": "set: whether this write is the value."},
            "why": string(
                description="A set that lost: overwritten by, lost to (the greater clock and "
                "origin), cleared by the delete of the create it was written under (or, "
                "for a write naming no create, by a create), or written under a create "
                "not here yet."
            ),
            "observed": array(string(description="remove/delete: the dots it removed.")),
        },
        tuple(EVENT),
    ),
    "History": obj(
        {
            "id": ID,
            "kind": string(enum=["user", "group"]),
            "events": array(ref("HistoryEvent")),
            "next_cursor": nullable(string("^[0-9]+$")),
        }
    ),
    "Change": obj(
        {
            **EVENT,
            "stream": string("^(user|group)/", description="`user/<id>` or `group/<id>`."),
            "field": nullable(string()),
            "value": nullable(string()),
            "observed": array(string()),
        }
    ),
    "ChangeList": obj({"changes": array(ref("Change")), "next_cursor": string("^[0-9]+$")}),
    "Conflicts": obj({"conflicts": array(CONFLICT), "next_cursor": nullable(string())}),
    "Health": obj({"status": string(enum=["ok"])}),
    "Status": obj(
        {
            "region": string(),
            "replica_id": string(),
            "seq": integer(description="The last local sequence number (change feed position)."),
            "summary": map_of(obj({"contiguous": integer(), "beyond_gap": integer()})),
            "token": string(description="A consistency token for this node's state."),
            "digest": string("^[0-9a-f]{32}$", description="Equal on replicas that agree."),
            "peers": array(obj({"name": string(), "url": string()})),
            "serving": {"type": "boolean"},
            "not_ready": nullable(string(description="Why clients get 503 `not_ready`.")),
            "writes_held": nullable(
                string(description="Why client writes wait (at start, for every peer's answer).")
            ),
            "writes_failing": nullable(
                obj(
                    {
                        "error": string(description="The storage's latest refusal."),
                        "full": {"type": "boolean"},
                        "since": string(
                            description="The first refusal since a commit went through."
                        ),
                        "commits": integer(),
                        "requests": integer(),
                    },
                    description="Commits the storage refuses (a full disk): writes get 507 or 503.",
                )
            ),
            "writer": obj({"queued": integer(), "commits": integer(), "requests": integer()}),
            "uptime_s": {"type": "number"},
        },
        additionalProperties=True,
        description="Extensions add keys, e.g. `replication` (peers with their lag).",
    ),
}


# -- parameters, headers, responses --------------------------------------------------


def param(name: str, where: str, schema: Json, description: str) -> Json:
    out = {"name": name, "in": where, "schema": schema, "description": description}
    return {**out, "required": True} if where == "path" else out


PARAMETERS: Json = {
    "id": param("id", "path", ID, "Entity id."),
    "user_id": param("user_id", "path", ID, "User id."),
    "limit": param("limit", "query", integer(minimum=1, maximum=1000, default=50), "Page size."),
    "cursor": param(
        "cursor",
        "query",
        string("^[A-Za-z0-9_-]{1,200}$", maxLength=200),
        "`next_cursor` of the previous page: an id, or with `q` the search's own.",
    ),
    "conflicts_cursor": param(
        "cursor",
        "query",
        string("^[A-Za-z0-9_-]{1,1400}$", maxLength=1400),
        "`next_cursor` of the previous page.",
    ),
    "at": param(
        "at",
        "query",
        string(),
        "As of then: ISO-8601 time with zone, or a token (its named origins' events only).",
    ),
    "email": param("email", "query", string(), "Exact email, ASCII in any case (one page)."),
    "username": param("username", "query", string(), "Exact username, any case (one page)."),
    "q": param("q", "query", string(maxLength=200), "Each word prefixes a word of the user."),
    "since": param("since", "query", string("^[0-9]{1,19}$", default="0"), "A `next_cursor`."),
    "wait": param("wait", "query", integer(minimum=0, maximum=30_000), "Long-poll up to (ms)."),
}
HEADER_PARAMS: dict[str, tuple[Json, str]] = {
    "If-Match": (string(), "ETag (or `*`): write only if it is current, else 412."),
    "If-None-Match": (string(), "ETag (or `*`): 304 if it is current."),
    "X-Actor": (string(maxLength=ACTOR_CHARS_MAX), "Who writes, for the audit trail."),
    "X-Consistency-Token": (string(maxLength=TOKEN_CHARS_MAX), "Wait to cover it; else 504."),
    "X-Wait-Ms": (integer(minimum=0, maximum=60_000, default=5_000), "Wait at most (ms)."),
}
PARAMETERS.update({n: param(n, "header", s, d) for n, (s, d) in HEADER_PARAMS.items()})
HEADER_TEXT = {
    "X-Consistency-Token": "A write's covers the events it wrote; others, this node's state.",
    "ETag": "Changes whenever an event is applied to the entity.",
    "Location": "Path of the created entity.",
    "Retry-After": "Seconds to wait before retrying (`overloaded`, `storage_*`).",
    "Allow": "The methods the path allows.",
}
HEADERS: Json = {
    name: {"description": text, "required": name != "Retry-After", "schema": string()}
    for name, text in HEADER_TEXT.items()
}


def response(text: str, schema: Json | None = None, *headers: str, media: str = "") -> Json:
    names = ("X-Consistency-Token", *headers)
    out: Json = {"description": text, "headers": {h: ref(h, "headers") for h in names}}
    if schema is not None:
        out["content"] = {media or "application/json": {"schema": schema}}
    return out


EXTRA_HEADERS = {405: ("Allow",), 503: ("Retry-After",), 507: ("Retry-After",)}
RESPONSES: Json = {
    str(s): response(text, ref("Error"), *EXTRA_HEADERS.get(s, ())) for s, text in ERRORS.items()
}
RESPONSES["default"] = response("Unexpected error (`internal`); never for bad input.", ref("Error"))


# -- operations -----------------------------------------------------------------------


def op(
    summary: str,
    ok: dict[int, Json],
    params: str = "",
    *,
    fails: tuple[int, ...] = (),
    body: str | None = None,
    reads: bool = False,
    writes: bool = False,
) -> Json:
    """``params`` names components/parameters. ``reads``: honours X-Consistency-Token
    (400 if bad, 504 if not seen in time); ``writes``: goes through the writer (X-Actor,
    400 if too long); ``body``: a JSON body of that schema (413, 415, 422)."""
    names = params.split()
    found = {*fails, 401, 503}
    if "id" in names:
        found.add(404)
    if reads:
        names += ["X-Consistency-Token", "X-Wait-Ms"]
        found |= {400, 504}
    if writes:
        names += ["X-Actor"]
        found |= {400, 507}
    if body is not None:
        found |= {413, 415, 422}
    out: Json = {
        "summary": summary,
        "parameters": [ref(name, "parameters") for name in names],
        "responses": {
            **{str(s): r for s, r in ok.items()},
            **{str(s): ref(str(s), "responses") for s in sorted(found)},
            "default": ref("default", "responses"),
        },
    }
    if body is not None:
        json_body = {"application/json": {"schema": ref(body)}}
        out["requestBody"] = {"required": True, "content": json_body}
    return out


REMOVED = {204: response("Removed (or was not a member).")}


def entity_paths(kind: str, title: str) -> Json:
    """POST /<kind>s, GET/PATCH/DELETE /<kind>s/{id}, /<kind>s/{id}/history."""
    one = response(f"The {kind}.", ref(title), "ETag")
    created = response("Created.", ref(title), "ETag", "Location")
    unchanged = response("Unchanged since the If-None-Match ETag; no body.", None, "ETag")
    history = response("The events in local order, a page at a time.", ref("History"))
    unique = (409,) if kind == "user" else ()
    also = " and its memberships" if kind == "user" else ""
    return {
        f"/{kind}s": {
            "post": op(
                f"Create a {kind}; an id is generated unless one is given.",
                {201: created},
                fails=(409,),
                body=f"{title}Create",
                writes=True,
            )
        },
        f"/{kind}s/{{id}}": {
            "get": op(
                f"The {kind}, or as of `at`.",
                {200: one, 304: unchanged},
                "id at If-None-Match",
                reads=True,
            ),
            "patch": op(
                f"Set some fields of the {kind}.",
                {200: one},
                "id If-Match",
                fails=(*unique, 412),
                body=f"{title}Patch",
                writes=True,
            ),
            "delete": op(
                f"Delete the {kind}{also}.",
                {204: response("Deleted.")},
                "id If-Match",
                fails=(412,),
                writes=True,
            ),
        },
        f"/{kind}s/{{id}}/history": {
            "get": op(
                f"Every event of the {kind}, even deleted.",
                {200: history},
                "id limit cursor",
                reads=True,
            )
        },
    }


def ok(schema: str | Json, text: str = "OK.", media: str = "") -> dict[int, Json]:
    return {200: response(text, ref(schema) if isinstance(schema, str) else schema, media=media)}


PATHS: Json = {**entity_paths("user", "User"), **entity_paths("group", "Group")}
PATHS["/groups/{id}/members/{user_id}"] = {
    "put": op("Add the member (idempotent).", ok("Membership"), "id user_id", writes=True),
    "delete": op("Remove the member (idempotent).", REMOVED, "id user_id", writes=True),
}
LIST_USERS = (
    "Look up by `email` or `username` (ASCII letters in any case), search with `q` (any case),"
    " or list all."
)
FEED = "Events after `since` in this node's arrival order; `wait` long-polls for one."
READS: dict[str, tuple[str, dict[int, Json], str]] = {
    "/users": (
        LIST_USERS,
        ok("UserList", "`next_cursor` null: last page."),
        "email username q limit cursor",
    ),
    "/users/{id}/groups": ("The groups the user is in.", ok("UserGroups"), "id"),
    "/groups/{id}/members": ("Members in id order.", ok("MemberList"), "id limit cursor"),
    "/changes": (
        FEED,
        ok("ChangeList", "Pass `next_cursor` as the next `since`."),
        "since limit wait",
    ),
    "/conflicts": (
        "Unique values claimed by several users, and ids created in two regions at once.",
        ok("Conflicts", "`next_cursor` null: last page."),
        "limit conflicts_cursor",
    ),
    "/health": ("Liveness; open without the API token.", ok("Health"), ""),
    "/status": ("Region, replica id, log position, summary, peers.", ok("Status"), ""),
    "/metrics": ("Prometheus metrics.", ok(string(), "Format 0.0.4.", "text/plain"), ""),
    "/openapi.json": ("This document.", ok({"type": "object"}, "OpenAPI 3.0.3."), ""),
}
for _path, (_summary, _answers, _params) in READS.items():
    PATHS.setdefault(_path, {})["get"] = op(_summary, _answers, _params, reads=True)
for _path in ("/health", "/status", "/metrics", "/openapi.json"):  # served even when not ready
    del PATHS[_path]["get"]["responses"]["503"]
PATHS["/health"]["get"]["security"] = []
del PATHS["/health"]["get"]["responses"]["401"]
for _path, _methods in PATHS.items():
    for _method, _operation in _methods.items():
        _words = [w.strip("{}") for w in re.split(r"[/._]", _path) if w and w != "json"]
        _operation["operationId"] = _method + "".join(w.capitalize() for w in _words)
        _operation["tags"] = [{"users": "users", "groups": "groups"}.get(_words[0], "node")]

OPENAPI: Json = {
    "openapi": "3.0.3",
    "info": {
        "title": "replica-store",
        "version": "0.1.0",
        "description": "One region's node of a CRDT multi-region identity store. Errors are "
        "JSON `{error, message, ...}`; a method a path does not allow answers 405, an unknown "
        "path 404. Every answer, errors included, carries X-Consistency-Token. A node configured "
        "with an API token wants it as a bearer token on every request but `GET /health`.",
    },
    "tags": [{"name": "users"}, {"name": "groups"}, {"name": "node"}],
    "security": [{"bearerAuth": []}],
    "paths": PATHS,
    "components": {
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        "schemas": SCHEMAS,
        "parameters": PARAMETERS,
        "headers": HEADERS,
        "responses": RESPONSES,
    },
}
