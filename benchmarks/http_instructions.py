"""CPU instructions a server executes per request, counted by valgrind: the HTTP figures
without the neighbours' noise.

Requests per second on a shared machine move by a quarter from one run to the next for
the same code. The instructions a request costs do not: this runs the node and the bare
server (``benchmarks.bare_server``, the baseline of the HTTP benchmarks) under
``valgrind --tool=callgrind`` with instrumentation off, warms each up, then counts the
user-space instructions of N requests per scenario, turning instrumentation on and off
around them (``callgrind_control``). Kernel time (sockets, fsync) is not counted; it is
about the same for both servers. Needs valgrind; without it the benchmark reports nothing.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import aiohttp

from benchmarks import bare_server
from benchmarks.common import Row, row, scratch_dir
from benchmarks.httpbench import (
    fetch_all,
    free_port,
    seed_users,
    start_listening,
    stop_process,
    user_fields,
)
from node.process import node_command

NAME = "HTTP instructions"
USERS = 5_000
CONCURRENCY = 8
START_WAIT_S = 300.0  # python and aiohttp starting under valgrind
CONTROL_WAIT_S = 60.0
POKE_INTERVAL_S = 0.05


def available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


class Counted:
    """A server process under callgrind, its instruction counter read scenario by scenario."""

    def __init__(self, command: Callable[[str], list[str]], out_dir: Path) -> None:
        """``command(listen)``: the server's command line, listening on ``listen``."""
        self.out_dir = out_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out_dir}/callgrind.%p",
            f"--log-file={out_dir}/valgrind.log",
            *command(f"127.0.0.1:{self.port}"),
        ]
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        with (self.out_dir / "server.log").open("a") as log:  # the child keeps its own copy
            self.proc = start_listening(self.args, START_WAIT_S, stderr=log)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 60)  # valgrind writes its totals on the way out

    async def _control(self, session: aiohttp.ClientSession, *option: str) -> None:
        """Run ``callgrind_control`` on the server; it acts when the server next runs, so
        the server is sent /health requests meanwhile (a sleeping one would never see it)."""
        assert self.proc is not None
        control = await asyncio.create_subprocess_exec(
            "callgrind_control",
            *option,
            str(self.proc.pid),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + CONTROL_WAIT_S
        while control.returncode is None:
            if time.monotonic() > deadline:
                control.kill()
                raise RuntimeError(f"callgrind_control {' '.join(option)} did not answer")
            async with session.get(self.url + "/health") as response:
                await response.read()
            with suppress(TimeoutError):
                await asyncio.wait_for(control.wait(), POKE_INTERVAL_S)
        if control.returncode != 0:
            raise RuntimeError(f"callgrind_control {' '.join(option)} failed")

    async def count(
        self, session: aiohttp.ClientSession, work: Callable[[], Awaitable[None]]
    ) -> int:
        """The instructions the server executes while ``work`` runs."""
        await self._control(session, "--dump")  # whatever came before goes to a file of its own
        before = set(self.out_dir.glob("callgrind.*"))
        await self._control(session, "--instr=on")
        await work()
        await self._control(session, "--instr=off")
        await self._control(session, "--dump")
        dumped = sorted(set(self.out_dir.glob("callgrind.*")) - before)
        return sum(_instructions(path) for path in dumped)


def _instructions(path: Path) -> int:
    """The instruction count of one callgrind dump: its ``totals:`` line (its ``summary:``
    line stays 0 when instrumentation started off)."""
    found = re.findall(r"^totals:\s+(\d+)", path.read_text(errors="replace"), re.MULTILINE)
    return sum(int(n) for n in found)


@contextmanager
def counted(command: Callable[[str], list[str]], out_dir: Path) -> Iterator[Counted]:
    out_dir.mkdir(parents=True, exist_ok=True)
    server = Counted(command, out_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _requests(
    session: aiohttp.ClientSession, url: str, kind: str, ids: list[str], n: int, seed: int
) -> Callable[[], Awaitable[None]]:
    """``n`` requests of one kind over random users, ``CONCURRENCY`` at a time."""
    rng = random.Random(seed)

    async def one(i: int) -> None:
        user = rng.choice(ids)
        if kind == "id":
            call = session.get(f"{url}/users/{user}")
        elif kind == "email":
            call = session.get(f"{url}/users?email={user_fields(user)['email']}")
        else:
            body = json.dumps({"name": f"Counted name {seed}-{i}"}).encode()
            headers = {"Content-Type": "application/json"}
            call = session.patch(f"{url}/users/{user}", data=body, headers=headers)
        async with call as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"{kind}: HTTP {response.status}")

    async def run() -> None:
        for start in range(0, n, CONCURRENCY):
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + CONCURRENCY))))

    return run


async def _measure(
    server: Counted, ids: list[str], reads_n: int, writes_n: int
) -> tuple[dict[str, int], list[bytes]]:
    """Instructions per request of each kind, after a warm-up that reads every user once
    each way (the node keeps decoded states and rendered JSON, as it would when serving);
    and the users' JSON as the warm-up read it."""
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        url = server.url
        await _requests(session, url, "patch", ids, 200, seed=1)()
        bodies = await fetch_all(url, [f"/users/{u}" for u in ids])
        await fetch_all(url, [f"/users?email={user_fields(u)['email']}" for u in ids])
        per_request = {}
        for kind, n in (("id", reads_n), ("email", reads_n), ("patch", writes_n)):
            total = await server.count(session, _requests(session, url, kind, ids, n, seed=2))
            per_request[kind] = round(total / n)
    return per_request, bodies


def run(quick: bool) -> list[Row]:
    if not available():
        print("   valgrind is not installed: no instruction counts", file=sys.stderr)
        return []
    users = 1_000 if quick else USERS
    reads_n, writes_n = (300, 150) if quick else (2_000, 1_000)
    with scratch_dir("http-instructions") as tmp:
        base = Path(tmp)
        ids = seed_users(base / "node", users)

        def node(listen: str) -> list[str]:
            return node_command("eu", base / "node", listen)

        def bare(listen: str) -> list[str]:
            data = str(base / "bare")
            return [
                sys.executable,
                "-m",
                "benchmarks.bare_server",
                "--data",
                data,
                "--listen",
                listen,
            ]

        with counted(node, base / "node-counts") as server:
            node_counts, bodies = asyncio.run(_measure(server, ids, reads_n, writes_n))
        emails = (user_fields(u)["email"] for u in ids)
        bare_server.load(base / "bare", zip(ids, emails, bodies, strict=True))
        with counted(bare, base / "bare-counts") as server:
            bare_counts, _ = asyncio.run(_measure(server, ids, reads_n, writes_n))
    rows = []
    for what, key in (
        ("GET /users/{id}", "id"),
        ("GET /users?email=", "email"),
        ("PATCH /users/{id}", "patch"),
    ):
        figure = f"{what}: server instructions per request ({CONCURRENCY} in flight)"
        rows.append(row(NAME, figure, node_counts[key] / 1e3, "k", bare_counts[key] / 1e3))
    return rows
