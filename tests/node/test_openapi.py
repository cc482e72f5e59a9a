"""The OpenAPI document matches the app: same routes, and real traffic fits its schemas.

A tiny JSON-schema checker (the subset the document uses) validates the requests and
answers of a scripted session that exercises every documented operation.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from json import loads as json_loads  # ``json`` is a parameter name in Session.send
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from crdt import Dot
from crdt.clock import make_stamp
from node.api import UNMATCHED, build_app
from node.config import Settings
from node.events import Event, Op
from node.kv import MemoryKV
from node.openapi import OPENAPI
from node.replica import Replica
from node.tokens import encode_token
from tests.node.api_client import Api, run

TOKEN = "s3cret"
API_HEADERS = ("If-Match", "If-None-Match", "X-Actor", "X-Consistency-Token", "X-Wait-Ms")
KEYWORDS = {
    "$ref", "type", "nullable", "enum", "pattern", "minLength", "maxLength", "minimum",
    "maximum", "required", "properties", "additionalProperties", "minProperties",
    "maxProperties", "items", "format", "description", "default",
}  # fmt: skip
DATE_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
TYPES: dict[str, Any] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "object": dict,
    "array": list,
}


# -- a tiny schema checker -----------------------------------------------------------


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        found: Any = OPENAPI
        for part in node["$ref"].removeprefix("#/").split("/"):
            found = found[part]
        node = found
    return node


def ecma_search(pattern: str, text: str) -> bool:
    """ECMA-262 ``pattern`` semantics: unanchored, and ``$`` is the very end."""
    if pattern.endswith("$"):
        pattern = pattern[:-1] + r"\Z"
    return re.search(pattern, text) is not None


def is_a(kind: str, value: Any) -> bool:
    return isinstance(value, TYPES[kind]) and (kind == "boolean" or not isinstance(value, bool))


def errors(schema: dict[str, Any], value: Any, where: str = "$") -> list[str]:
    """What is wrong with ``value`` under ``schema`` (empty: it is valid)."""
    schema = resolve(schema)
    unknown = set(schema) - KEYWORDS
    assert not unknown, f"the checker does not know {unknown} (at {where})"
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: null"]
    kind = schema.get("type")
    if kind is not None and not is_a(kind, value):
        return [f"{where}: not {kind}: {value!r}"]
    found: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", len(value)):
            found.append(f"{where}: longer than {schema['maxLength']}")
        if len(value) < schema.get("minLength", 0):
            found.append(f"{where}: shorter than {schema['minLength']}")
        if "pattern" in schema and not ecma_search(schema["pattern"], value):
            found.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if schema.get("format") == "date-time" and not DATE_TIME.fullmatch(value):
            found.append(f"{where}: {value!r} is not a date-time")
    if is_a("number", value) and not schema.get("minimum", value) <= value <= schema.get(
        "maximum", value
    ):
        found.append(f"{where}: {value} out of range")
    if isinstance(value, list):
        for n, item in enumerate(value):
            found += errors(schema.get("items", {}), item, f"{where}[{n}]")
    if isinstance(value, dict):
        found += object_errors(schema, value, where)
    return found


def object_errors(schema: dict[str, Any], value: dict[str, Any], where: str) -> list[str]:
    found = [f"{where}: missing {k}" for k in schema.get("required", ()) if k not in value]
    if not schema.get("minProperties", 0) <= len(value) <= schema.get("maxProperties", len(value)):
        found.append(f"{where}: wrong number of properties")
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            found += errors(properties[key], item, f"{where}.{key}")
        elif extra is False:
            found.append(f"{where}: unexpected {key}")
        elif isinstance(extra, dict):
            found += errors(extra, item, f"{where}.{key}")
    return found


def test_the_checker_catches_what_it_claims_to() -> None:
    user = OPENAPI["components"]["schemas"]["UserCreate"]
    assert errors(user, {"name": "A", "username": "ann", "email": "a@b.io"}) == []
    assert errors(user, {"name": "A", "username": "ann"}) == ["$: missing email"]
    assert errors(user, {"name": "A", "username": "ann\n", "email": "a@b.io"})
    assert errors(user, {"name": 1, "username": "ann", "email": "a@b.io", "x": 1}) == [
        "$.name: not string: 1",
        "$: unexpected x",
    ]
    assert errors({"type": "integer"}, True)
    assert errors({"type": "array", "items": {"type": "string"}}, ["a", 1]) == [
        "$[1]: not string: 1"
    ]
    with pytest.raises(AssertionError, match="does not know"):
        errors({"oneOf": []}, 1)


# -- the document and the router -----------------------------------------------------


def documented() -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, methods in OPENAPI["paths"].items() for m in methods}


def test_every_route_is_documented_and_every_documented_operation_is_routed() -> None:
    replica = Replica(MemoryKV(), "eu")
    try:
        app = build_app(replica, Settings(region="eu", data_dir=Path("unused")))
        routed = set()
        for route in app.router.routes():
            assert route.resource is not None
            if route.method != "HEAD" and route.name != UNMATCHED:  # the catch-all: no operation
                routed.add((route.method, route.resource.canonical))
    finally:
        replica.close()
    assert routed == documented()


def test_the_document_is_well_formed() -> None:
    assert OPENAPI["openapi"] == "3.0.3"
    assert json.loads(json.dumps(OPENAPI)) == OPENAPI

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if "$ref" in node else []
            return own + [r for value in node.values() for r in refs(value)]
        if isinstance(node, list):
            return [r for value in node for r in refs(value)]
        return []

    for target in refs(OPENAPI):
        assert resolve({"$ref": target}), target

    def keywords(schema: dict[str, Any], where: str) -> None:
        assert set(schema) <= KEYWORDS, (where, set(schema) - KEYWORDS)
        for name, sub in schema.get("properties", {}).items():
            keywords(sub, f"{where}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(schema.get(key), dict):
                keywords(schema[key], f"{where}.{key}")

    components = OPENAPI["components"]
    for name, schema in components["schemas"].items():
        keywords(schema, name)
    for name, parameter in components["parameters"].items():
        assert set(parameter) <= {"name", "in", "schema", "description", "required"}, name
        assert parameter["in"] in ("path", "query", "header")
        keywords(parameter["schema"], name)
    ids = [op["operationId"] for methods in OPENAPI["paths"].values() for op in methods.values()]
    assert len(ids) == len(set(ids))
    for path, methods in OPENAPI["paths"].items():
        for method, op in methods.items():
            assert method in ("get", "put", "post", "patch", "delete")
            allowed = {"summary", "operationId", "tags", "parameters", "requestBody", "responses"}
            assert set(op) <= allowed | {"security"}, (method, path)
            params = [resolve(p) for p in op["parameters"]]
            in_path = {p["name"] for p in params if p["in"] == "path"}
            assert in_path == set(re.findall(r"\{(\w+)\}", path)), (method, path)
            assert all(p["required"] for p in params if p["in"] == "path")
            names = [(p["in"], p["name"]) for p in params]
            assert len(names) == len(set(names)), (method, path)
            for status, answer in op["responses"].items():
                assert status == "default" or 200 <= int(status) < 600
                headers = resolve(answer).get("headers", {})
                assert "X-Consistency-Token" in headers, (method, path, status)
            if method in ("post", "patch"):
                assert op["requestBody"]["content"]["application/json"]["schema"]
    health = OPENAPI["paths"]["/health"]["get"]
    assert health["security"] == []
    assert "401" not in health["responses"]
    assert OPENAPI["security"] == [{"bearerAuth": []}]


def test_openapi_json_is_served() -> None:
    async def body(a: Api) -> None:
        r, served = await a.call("GET", "/openapi.json", status=200)
        assert r.content_type == "application/json"
        assert served == json.loads(json.dumps(OPENAPI))

    run(body)


# -- the value rules agree with the server -------------------------------------------

USER = {"name": "Ann", "username": "ann", "email": "ann@example.com"}


@pytest.mark.parametrize(
    "sent",
    [
        USER,
        {**USER, "id": "ann-1", "api_key": "k" * 8, "profile": {"tz": "UTC", "x": None}},
        {**USER, "username": "a"},
        {**USER, "username": "-ann"},
        {**USER, "username": "a" * 65},
        {**USER, "username": "ann\n"},
        {**USER, "email": "ann@example"},
        {**USER, "email": "a n@example.com"},
        {**USER, "email": "a" * 65 + "@example.com"},
        {**USER, "email": "ann@example.com\n"},
        {**USER, "name": ""},
        {**USER, "name": "   "},
        {**USER, "name": "n" * 200},
        {**USER, "name": "n" * 201},
        {**USER, "name": None},
        {**USER, "api_key": "short"},
        {**USER, "api_key": "k" * 129},
        {**USER, "id": "a/b"},
        {**USER, "id": "i" * 65},
        {**USER, "profile": {"tz": ""}},
        {**USER, "profile": {"tz": "x" * 1001}},
        {**USER, "profile": {f"k{n}": "v" for n in range(65)}},
        {**USER, "profile": []},
        {**USER, "groups": []},
        {"name": "Ann", "username": "ann"},
    ],
)
def test_a_user_body_the_schema_refuses_is_refused_by_the_server(sent: dict[str, Any]) -> None:
    schema = OPENAPI["paths"]["/users"]["post"]["requestBody"]["content"]["application/json"]

    async def body(a: Api) -> None:
        r, answer = await a.call("POST", "/users", json=sent)
        problems = errors(schema["schema"], sent)
        assert (r.status != 201) == bool(problems), (r.status, answer, problems)
        assert r.status in (201, 400, 422)

    run(body)


# -- a scripted session, validated against the document ------------------------------


def operation_of(method: str, path: str) -> tuple[str, dict[str, Any] | None]:
    for template, methods in OPENAPI["paths"].items():
        pattern = re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            if method.lower() in methods:
                return template, methods[method.lower()]
            return template, None
    raise AssertionError(f"{method} {path} is not documented")


@dataclass
class Session:
    a: Api
    seen: set[tuple[str, str, int]] = field(default_factory=set)

    async def send(
        self,
        method: str,
        url: str,
        status: int,
        *,
        json: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
        valid: bool = True,
    ) -> Any:
        """Check the request against the document, send it, check the answer."""
        headers = dict(headers or {})
        if auth:
            headers["Authorization"] = f"Bearer {TOKEN}"
        parts = urlsplit(url)
        template, op = operation_of(method, parts.path)
        if op is not None:
            params = {(p["in"], p["name"]) for p in map(resolve, op["parameters"])}
            for name, _ in parse_qsl(parts.query, keep_blank_values=True):
                assert ("query", name) in params, (method, template, name)
            for name in headers:
                assert name not in API_HEADERS or ("header", name) in params, (template, name)
            if json is not None:
                schema = op["requestBody"]["content"]["application/json"]["schema"]
                assert (errors(schema, json) == []) == valid, (template, json)
        r = await self.a.client.request(method, url, json=json, data=data, headers=headers)
        raw = await r.read()
        assert r.status == status, (method, url, r.status, raw)
        if op is None:  # a method the path does not allow
            assert status == 405
            answer = resolve(OPENAPI["components"]["responses"]["405"])
        else:
            answer = resolve(op["responses"][str(status)])
        for name, spec in answer.get("headers", {}).items():
            assert name in r.headers or not resolve(spec)["required"], (template, status, name)
        body: Any = None
        if "content" not in answer:
            assert raw == b"", (method, template, status)
        else:
            assert r.content_type in answer["content"], (method, template, r.content_type)
            schema = answer["content"][r.content_type]["schema"]
            body = json_loads(raw) if r.content_type == "application/json" else raw.decode()
            assert errors(schema, body) == [], (method, template, status, body)
        self.seen.add((method, template, status))
        return body


def test_a_session_covering_every_operation_fits_the_document() -> None:
    async def body(a: Api) -> None:
        s = Session(a)
        ann = await s.send("POST", "/users", 201, json={**USER, "profile": {"tz": "UTC"}})
        uid = ann["id"]
        bob = {"id": "bob", "username": "bob", "email": "bob@example.com", "api_key": "bobs-key"}
        await s.send("POST", "/users", 201, json={**USER, **bob})
        await s.send("POST", "/users", 409, json=USER)
        await s.send("POST", "/users", 422, json={**USER, "email": "nope"}, valid=False)
        await s.send("POST", "/users", 400, json={**USER, "x": 1}, valid=False)
        await s.send("POST", "/users", 400, data=b"{", headers={"Content-Type": "application/json"})
        await s.send("POST", "/users", 415, data=b"{}", headers={"Content-Type": "text/plain"})
        await s.send("POST", "/users", 413, json={**USER, "name": "n" * 5000}, valid=False)
        await s.send("POST", "/users", 401, json=USER, auth=False)
        await s.send("PUT", "/users", 405)

        one = f"/users/{uid}"
        await s.send("GET", one, 200)
        r = await a.client.get(one, headers={"Authorization": f"Bearer {TOKEN}"})
        etag = r.headers["ETag"]
        await s.send("GET", one, 304, headers={"If-None-Match": etag})
        await s.send("GET", "/users/nobody", 404)
        await s.send("GET", f"{one}?at=2999-01-01T00:00:00Z", 200)
        await s.send("GET", f"{one}?at=yesterday", 400)
        patch = {"name": "Ann B", "profile": {"tz": None, "team": "core"}}
        await s.send("PATCH", one, 200, json=patch, headers={"If-Match": etag, "X-Actor": "ops"})
        await s.send("PATCH", one, 412, json={"name": "C"}, headers={"If-Match": etag})
        await s.send("PATCH", one, 409, json={"email": "BOB@example.com"})
        await s.send("PATCH", one, 422, json={}, valid=False)
        await s.send("PATCH", "/users/nobody", 404, json={"name": "N"})
        listed = await s.send("GET", "/users?limit=1", 200)
        await s.send("GET", f"/users?limit=1&cursor={listed['next_cursor']}", 200)
        found = await s.send("GET", "/users?q=example&limit=1", 200)
        await s.send("GET", f"/users?q=example&limit=1&cursor={found['next_cursor']}", 200)
        await s.send("GET", "/users?q=ann&cursor=Zm9v", 400)  # not a search's cursor
        await s.send("GET", "/users?email=ANN@example.com", 200)
        await s.send("GET", "/users?username=BOB", 200)
        await s.send("GET", "/users?limit=0", 400)
        await s.send("GET", f"{one}/history", 200)

        group = await s.send("POST", "/groups", 201, json={"name": "Admins"})
        gid = group["id"]
        await s.send("POST", "/groups", 409, json={"id": gid, "name": "Again"})
        await s.send("GET", f"/groups/{gid}", 200)
        await s.send("PATCH", f"/groups/{gid}", 200, json={"name": "Root"})
        await s.send("PUT", f"/groups/{gid}/members/{uid}", 200, headers={"X-Actor": "ops"})
        await s.send("PUT", f"/groups/{gid}/members/bob", 200)
        await s.send("PUT", f"/groups/{gid}/members/nobody", 404)
        await s.send("GET", f"/groups/{gid}/members?limit=1", 200)
        await s.send("GET", f"/groups/{gid}/members?limit=1&cursor=bob", 200)
        await s.send("GET", f"/users/{uid}/groups", 200)
        await s.send("DELETE", f"/groups/{gid}/members/bob", 204)
        await s.send("GET", f"/groups/{gid}/history", 200)

        stamp = make_stamp(int(time.time() * 1000), 0)
        stream, email = "user/bob-us", "bob@example.com"
        await a.replica.ingest(
            [
                Event(Dot("us~abcd", 1), stamp, stream, Op.CREATE),
                Event(Dot("us~abcd", 2), stamp + 1, stream, Op.SET, "email", email),
            ]
        )
        conflicts = await s.send("GET", "/conflicts", 200)
        assert conflicts["conflicts"]
        await s.send("GET", "/users/bob-us", 200)  # no name, username: still a valid User
        feed = await s.send("GET", "/changes?since=0&limit=500", 200)
        await s.send("GET", f"/changes?since={feed['next_cursor']}&wait=10", 200)
        await s.send("GET", "/changes?since=x", 400)
        await s.send("GET", "/health", 200, auth=False)
        await s.send("GET", "/status", 200)
        await s.send("GET", "/metrics", 200)
        await s.send("GET", "/openapi.json", 200)
        future = {"X-Consistency-Token": encode_token({"eu~zzzz": 1}), "X-Wait-Ms": "20"}
        await s.send("GET", "/status", 504, headers=future)
        await s.send("GET", "/status", 400, headers={"X-Consistency-Token": "?"})
        a.replica.not_ready = "bootstrapping from peers"
        await s.send("GET", "/users", 503)
        await s.send("POST", "/groups", 503, json={"name": "Later"})
        status = await s.send("GET", "/status", 200)
        assert (status["serving"], status["not_ready"]) == (False, "bootstrapping from peers")
        a.replica.not_ready = None

        await s.send("DELETE", f"/groups/{gid}/members/{uid}", 204)
        await s.send("DELETE", f"/groups/{gid}", 412, headers={"If-Match": '"0"'})
        await s.send("DELETE", f"/groups/{gid}", 204)
        await s.send("DELETE", one, 204, headers={"X-Actor": "ops"})
        await s.send("DELETE", one, 404)

        exercised = {(method, template) for method, template, _ in s.seen}
        exercised.discard(("PUT", "/users"))  # the 405
        assert exercised == documented()
        statuses = {status for _, _, status in s.seen}
        assert statuses >= {
            200,
            201,
            204,
            304,
            400,
            401,
            404,
            405,
            409,
            412,
            413,
            415,
            422,
            503,
            504,
        }

    run(body, api_token=TOKEN, body_bytes_max=4096)
