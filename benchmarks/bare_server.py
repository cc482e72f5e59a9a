"""The ceiling of the stack: a bare aiohttp server over LMDB, for the HTTP baselines.

Writes (``POST /users``, ``PATCH /users/{id}``) append the request body to LMDB through
the same architecture as the node: one writer thread takes every request waiting (up
to 512), puts them in one write transaction, commits durably (``sync`` and ``metasync``
on, as the node's default), and only then answers. Reads (``GET /users/{id}``,
``GET /users?email=``) return stored JSON bytes from a read transaction. No validation,
no events, no views, no tokens.

    python -m benchmarks.bare_server --data DIR --listen 127.0.0.1:PORT [--no-metasync]
        [--event-loop uvloop|asyncio]

It runs on the node's default event loop (uvloop) unless told otherwise.

Preload with ``load(dir, users)`` before starting it (``users``: id -> (email, JSON bytes)).
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lmdb
from aiohttp import web

from node.event_loop import EVENT_LOOP_DEFAULT, EVENT_LOOPS, run_on, running_loop_name

BATCH_REQUESTS_MAX = 512
QUEUE_REQUESTS_MAX = 10_000
MAP_BYTES = 1 << 30


def open_env(path: Path, *, metasync: bool = True) -> tuple[Any, Any, Any]:
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=MAP_BYTES, max_dbs=4, sync=True, metasync=metasync)
    with env.begin(write=True) as txn:
        log = env.open_db(b"log", txn=txn)
        docs = env.open_db(b"docs", txn=txn)
    return env, log, docs


def load(path: Path, users: Iterable[tuple[str, str, bytes]]) -> None:
    """Store each user's JSON under its id, and its id under its casefolded email."""
    env, _, docs = open_env(path)
    with env.begin(write=True, db=docs) as txn:
        for user_id, email, body in users:
            txn.put(b"u/" + user_id.encode(), body)
            txn.put(b"e/" + email.casefold().encode(), user_id.encode())
    env.close()


class GroupCommit:
    def __init__(self, env: Any, db: Any) -> None:
        self.env, self.db = env, db
        self.seq = 0
        self.queue: queue.Queue[tuple[asyncio.AbstractEventLoop, asyncio.Future[int], bytes] | None]
        self.queue = queue.Queue(maxsize=QUEUE_REQUESTS_MAX)
        with env.begin(db=db) as txn, txn.cursor() as cursor:
            if cursor.last():
                self.seq = int.from_bytes(cursor.key(), "big")
        self.thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self.thread.start()

    async def append(self, data: bytes) -> int:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self.queue.put_nowait((loop, future, data))
        return await future

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            stopping = item is None
            batch = [] if item is None else [item]
            while not stopping and len(batch) < BATCH_REQUESTS_MAX:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
            if batch:
                seqs = []
                with self.env.begin(write=True, db=self.db) as txn:
                    for _, _, data in batch:
                        self.seq += 1
                        txn.put(self.seq.to_bytes(8, "big"), data, append=True)
                        seqs.append(self.seq)
                for (loop, future, _), seq in zip(batch, seqs, strict=True):
                    loop.call_soon_threadsafe(_settle, future, seq)
            if stopping:
                return


def _settle(future: asyncio.Future[int], seq: int) -> None:
    if not future.done():
        future.set_result(seq)


def build_app(env: Any, log: Any, docs: Any) -> tuple[web.Application, GroupCommit]:
    writer = GroupCommit(env, log)

    async def write(request: web.Request) -> web.Response:
        body = await request.read()
        await writer.append(body)
        status = 201 if request.method == "POST" else 200
        return web.Response(status=status, body=body, content_type="application/json")

    async def get_user(request: web.Request) -> web.Response:
        with env.begin(db=docs) as txn:
            body = txn.get(b"u/" + request.match_info["id"].encode())
        if body is None:
            return web.json_response({"error": "not_found"}, status=404)
        return web.Response(body=body, content_type="application/json")

    async def list_users(request: web.Request) -> web.Response:
        email = request.query.get("email", "")
        with env.begin(db=docs) as txn:
            user_id = txn.get(b"e/" + email.casefold().encode())
            body = None if user_id is None else txn.get(b"u/" + user_id)
        found = b"" if body is None else body
        return web.Response(
            body=b'{"users": [' + found + b'], "next_cursor": null}',
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_post("/users", write)
    app.router.add_patch("/users/{id}", write)
    app.router.add_get("/users/{id}", get_user)
    app.router.add_get("/users", list_users)
    return app, writer


async def serve(data: Path, host: str, port: int, metasync: bool) -> None:
    env, log, docs = open_env(data, metasync=metasync)
    app, writer = build_app(env, log, docs)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"bare server listening on http://{host}:{port} ({running_loop_name()})", flush=True)
    await stop.wait()
    await runner.cleanup()
    writer.stop()
    env.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--no-metasync", action="store_true")
    # The node's default loop, so that both servers stand on the same stack.
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default=EVENT_LOOP_DEFAULT)
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    run_on(args.event_loop, serve(args.data, host, int(port), not args.no_metasync))


if __name__ == "__main__":
    main()
