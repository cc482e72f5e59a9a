"""Helpers for end-to-end replication tests on a real ``LocalCluster``.

A cluster of real ``replica node`` processes (each peer link through a fault proxy), a
small JSON client, bounded waits that fail with every node's ``/status``, a concurrent
write load that records every acknowledged write by the dot it wrote, and the checks
that every acknowledged write is present, identically, in every region.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from node.tokens import decode_token
from simulations.cluster import LocalCluster

GOSSIP_ARGS = ("--gossip-interval-ms", "100")
CONVERGE_WAIT_S = 30.0
HTTP_TIMEOUT_S = 15.0
ERROR_PAUSE_S = 0.05  # after a failed request, so a dead node is not hammered in a loop


@contextlib.asynccontextmanager
async def running(
    regions: Sequence[str],
    root: Path,
    *,
    node_args: Sequence[str] = (),
    **options: Any,
) -> AsyncIterator[LocalCluster]:
    """A started cluster; every node is stopped at the end, pass or fail."""
    cluster = LocalCluster(regions, root, node_args=[*GOSSIP_ARGS, *node_args], **options)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()


def session(ssl_context: ssl.SSLContext | None = None) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True)
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    headers: dict[str, str]

    @property
    def token(self) -> str:
        return self.headers["X-Consistency-Token"]


class Client:
    """JSON calls to the regions of one cluster."""

    def __init__(self, cluster: LocalCluster, http: aiohttp.ClientSession) -> None:
        self.cluster, self.http = cluster, http

    async def call(
        self,
        region: str,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        url = self.cluster.url(region) + path
        async with self.http.request(method, url, json=body, headers=headers) as r:
            data = await r.json() if r.content_type == "application/json" else await r.text()
            return Reply(r.status, data, dict(r.headers))

    async def ok(
        self,
        region: str,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """A call that must succeed (2xx)."""
        reply = await self.call(region, method, path, body, headers)
        assert 200 <= reply.status < 300, f"[{region}] {method} {path} -> {reply}"
        return reply

    async def statuses(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for region in self.cluster.regions:
            try:
                found[region] = (await self.call(region, "GET", "/status")).body
            except (aiohttp.ClientError, TimeoutError) as e:
                found[region] = f"unreachable: {e!r}"
        return found

    async def converged(self) -> bool:
        try:
            return await self.cluster.converged(self.http)
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def wait_converged(self, timeout_s: float = CONVERGE_WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.converged():
                return
            await asyncio.sleep(0.05)
        statuses = json.dumps(await self.statuses(), indent=1, sort_keys=True)
        raise AssertionError(f"no convergence within {timeout_s} s; statuses:\n{statuses}")

    async def wait_for(
        self, what: str, check: Callable[[], Awaitable[bool]], timeout_s: float = CONVERGE_WAIT_S
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await check():
                return
            await asyncio.sleep(0.05)
        statuses = json.dumps(await self.statuses(), indent=1, sort_keys=True)
        raise AssertionError(f"{what}: not within {timeout_s} s; statuses:\n{statuses}")


# -- a concurrent write load ------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """An acknowledged (2xx) write, known by the dot of the last event it wrote."""

    region: str
    stream: str  # "user/<id>" or "group/<id>"
    op: str  # "create", "set", "add", "remove"
    field: str | None
    value: str | None
    dot: str  # "<origin>:<counter>"


async def copy_then_write(
    c: Client, cluster: LocalCluster, region: str, copy: Path, fields: dict[str, Any]
) -> Reply:
    """Stop ``region``, copy its directory to ``copy``, start it again, and write
    ``fields`` to user homer there: a write the copy lacks, which every region holds once
    this returns."""
    node = cluster.nodes[region]
    node.stop()
    shutil.copytree(node.data_dir, copy)
    await cluster.restart(region)
    written = await c.ok(region, "PATCH", "/users/homer", fields)
    await c.wait_converged()
    return written


def put_back(cluster: LocalCluster, region: str, copy: Path) -> None:
    """Stop ``region`` and put its directory back to ``copy`` (it is not started again)."""
    node = cluster.nodes[region]
    node.stop()
    shutil.rmtree(node.data_dir)
    shutil.copytree(copy, node.data_dir)


def written_dot(reply: Reply) -> str:
    """A write's token covers exactly the events it wrote: one origin, its last counter."""
    token = decode_token(reply.token)
    assert len(token) == 1, f"a write's token names one origin: {token}"
    ((origin, counter),) = token.items()
    return f"{origin}:{counter}"


@dataclass
class Load:
    """Writers against regions until a deadline; only 2xx answers are recorded."""

    client: Client
    group: str  # an existing group every writer adds its own users to
    shared_users: Sequence[str]  # existing users every writer patches (conflicts)
    acks: list[Ack] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)  # non-2xx answers, by region
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    async def run(self, regions: Sequence[str], writers_per_region: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(
            *(
                self.writer(region, f"{region}{w}", deadline)
                for region in regions
                for w in range(writers_per_region)
            )
        )

    async def writer(self, region: str, name: str, deadline: float) -> None:
        own: list[str] = []  # users this writer created (acknowledged)
        members: list[str] = []  # of those, the ones it added to the group (acknowledged)
        for step in itertools.count():
            if time.monotonic() >= deadline:
                return
            n = next(self._ids)
            value = f"{name}-{n}"
            kind = step % 5
            try:
                if kind == 0 or not own:
                    user_id = f"{name}u{n}"
                    body = {
                        "id": user_id,
                        "name": f"User {value}",
                        "username": user_id,
                        "email": f"{user_id}@load.example",
                        "profile": {"origin": region},
                    }
                    if await self._write(region, "POST", "/users", body, "create", None, None):
                        own.append(user_id)
                elif kind == 1:
                    target = self.shared_users[n % len(self.shared_users)]
                    await self._profile(region, target, "color", value)
                elif kind == 2:
                    await self._profile(region, own[n % len(own)], "motto", value)
                elif kind == 3 or not members:
                    candidates = [u for u in own if u not in members] or own
                    user_id = candidates[n % len(candidates)]
                    path = f"/groups/{self.group}/members/{user_id}"
                    added = await self._write(region, "PUT", path, None, "add", "members", user_id)
                    if added and user_id not in members:
                        members.append(user_id)
                else:
                    # Only a member this writer added here: the remove observes its add,
                    # so it writes an event (removing a non-member writes nothing).
                    user_id = members.pop(n % len(members))
                    path = f"/groups/{self.group}/members/{user_id}"
                    if not await self._write(
                        region, "DELETE", path, None, "remove", "members", user_id
                    ):
                        members.append(user_id)
            except (aiohttp.ClientError, TimeoutError, ConnectionError):
                self.errors[region] = self.errors.get(region, 0) + 1
                await asyncio.sleep(ERROR_PAUSE_S)

    async def _profile(self, region: str, user_id: str, key: str, value: str) -> None:
        body = {"profile": {key: value}}
        await self._write(
            region, "PATCH", f"/users/{user_id}", body, "set", f"profile.{key}", value
        )

    async def _write(
        self,
        region: str,
        method: str,
        path: str,
        body: Any,
        op: str,
        field_name: str | None,
        value: str | None,
    ) -> bool:
        reply = await self.client.call(region, method, path, body)
        if not 200 <= reply.status < 300:
            self.refused[region] = self.refused.get(region, 0) + 1
            await asyncio.sleep(ERROR_PAUSE_S)
            return False
        stream = _stream_of(method, path, body)
        self.acks.append(Ack(region, stream, op, field_name, value, written_dot(reply)))
        return True

    def acked(self, region: str) -> int:
        return sum(1 for a in self.acks if a.region == region)


def _stream_of(method: str, path: str, body: Any) -> str:
    parts = path.strip("/").split("/")
    if method == "POST":
        return f"{parts[0].removesuffix('s')}/{body['id']}"
    return f"{parts[0].removesuffix('s')}/{parts[1]}"


def entity_path(stream: str) -> str:
    kind, _, entity_id = stream.partition("/")
    return f"/{kind}s/{entity_id}"


# -- checks -------------------------------------------------------------------------------


async def histories(client: Client, streams: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per region, per stream: the audit trail's events by dot."""
    found: dict[str, dict[str, Any]] = {}
    for region in client.cluster.regions:
        per_stream: dict[str, Any] = {}
        for stream in streams:
            trail: dict[str, Any] = {}
            cursor: str | None = "0"
            while cursor is not None:  # a page at a time
                path = f"{entity_path(stream)}/history?limit=1000&cursor={cursor}"
                reply = await client.ok(region, "GET", path)
                trail.update((e["dot"], e) for e in reply.body["events"])
                cursor = reply.body["next_cursor"]
            per_stream[stream] = trail
        found[region] = per_stream
    return found


async def assert_acks_everywhere(client: Client, acks: Sequence[Ack]) -> None:
    """Every acknowledged write's event is in every region's history of its entity."""
    streams = sorted({a.stream for a in acks})
    trails = await histories(client, streams)
    missing = []
    for region, per_stream in trails.items():
        for ack in acks:
            event = per_stream[ack.stream].get(ack.dot)
            if event is None:
                missing.append(f"{region}: {ack}")
                continue
            assert event["origin"] == ack.dot.rpartition(":")[0], (region, ack, event)
            if ack.op == "create":
                creates = [e for e in per_stream[ack.stream].values() if e["op"] == "create"]
                assert any(e["origin"] == event["origin"] for e in creates), (region, ack)
            else:
                got = (event["op"], event.get("field"), event.get("value"))
                assert got == (ack.op, ack.field, ack.value), (region, ack, event)
    assert not missing, f"{len(missing)} acknowledged writes missing:\n" + "\n".join(missing[:20])


async def assert_identical(client: Client, streams: Sequence[str]) -> dict[str, Any]:
    """Every region answers the same JSON (and ETag) for every entity, member list and
    the conflicts; returns what the first region answered, by path."""
    paths = [entity_path(s) for s in streams]
    paths += [entity_path(s) + "/members?limit=1000" for s in streams if s.startswith("group/")]
    paths.append("/conflicts")
    seen: dict[str, Any] = {}
    for path in paths:
        answers = {}
        for region in client.cluster.regions:
            reply = await client.call(region, "GET", path)
            answers[region] = (reply.status, reply.body, reply.headers.get("ETag"))
        first = answers[client.cluster.regions[0]]
        assert all(a == first for a in answers.values()), f"{path} differs: {answers}"
        seen[path] = first[1]
    return seen


def assert_lww(trail: dict[str, Any], entity: dict[str, Any], field_name: str) -> None:
    """The field's final value is its write with the greatest (hlc, origin, counter),
    and the audit trail marks exactly that write as the winner."""
    writes = [e for e in trail.values() if e["op"] == "set" and e.get("field") == field_name]
    assert writes, f"no write of {field_name}"

    def order(e: dict[str, Any]) -> tuple[int, str, int]:
        origin, _, counter = e["dot"].rpartition(":")
        return e["hlc"], origin, int(counter)

    latest = max(writes, key=order)
    winners = [e for e in writes if e.get("won")]
    assert [w["dot"] for w in winners] == [latest["dot"]], (field_name, winners, latest)
    key = field_name.removeprefix("profile.")
    final = entity["profile"].get(key) if field_name.startswith("profile.") else entity[key]
    assert final == latest["value"], (field_name, final, latest)


def assert_lww_everywhere(
    acks: Sequence[Ack], seen: dict[str, Any], trails: dict[str, dict[str, Any]]
) -> int:
    """``assert_lww`` for every field an acknowledged write set; returns how many fields.

    ``seen`` is ``assert_identical``'s answer by path, ``trails`` one region's histories."""
    fields = sorted({(a.stream, a.field) for a in acks if a.op == "set" and a.field})
    for stream, field_name in fields:
        assert_lww(trails[stream], seen[entity_path(stream)], field_name)
    return len(fields)


# -- certificates (openssl CLI) -------------------------------------------------------------


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, f"openssl {' '.join(args)} failed:\n{done.stderr}"


def make_ca(directory: Path, name: str) -> Cert:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt",
        "ec_paramgen_curve:prime256v1", "-keyout", str(key), "-out", str(cert),
        "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        cwd=directory,
    )  # fmt: skip
    return Cert(cert, key)


def make_cert(directory: Path, name: str, ca: Cert, serial: int) -> Cert:
    """A certificate signed by ``ca`` for 127.0.0.1, good to serve and to present."""
    cert, key, csr = (directory / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
    extensions = directory / f"{name}.ext"
    extensions.write_text(
        "subjectAltName=IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyAgreement\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl(
        "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-set_serial", str(serial), "-days", "2", "-out", str(cert),
        "-extfile", str(extensions),
        cwd=directory,
    )  # fmt: skip
    return Cert(cert, key)


def client_context(ca: Path, cert: Cert | None) -> ssl.SSLContext:
    """Trusts ``ca``; presents ``cert`` if given."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    return context
