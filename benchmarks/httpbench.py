"""Shared machinery of the HTTP benchmarks: servers in their own processes, pinned to one
core, and a load generator in another process on the other core.

Load comes from ``wrk`` when it is installed (one thread, 64 connections, a Lua script
per scenario), else from ``benchmarks.loadgen`` (aiohttp, 64 concurrent connections).
Both report requests, errors, p50 and p99 latency. Loopback only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import aiohttp

from benchmarks import bare_server
from node import commands
from node.process import NodeProcess
from node.replica import Replica

CONNECTIONS = 64
SERVER_CORE, LOAD_CORE = 0, 1
START_WAIT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return []


def pin_process(pid: int, core: int) -> bool:
    """Pin every thread of ``pid`` to one core (threads started later inherit it)."""
    available = cores()
    if len(available) < 2:
        return False
    cpu = available[core % len(available)]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {cpu})
    except (OSError, ValueError):
        return False
    return True


def load_affinity() -> Any:
    """A preexec_fn pinning a child (the load generator) to the other core."""
    available = cores()
    if len(available) < 2:
        return None
    cpu = available[LOAD_CORE % len(available)]
    return lambda: os.sched_setaffinity(0, {cpu})


# -- servers ----------------------------------------------------------------------


class Node:
    """A real ``replica node`` process (``python -m node node ...``), pinned to one core."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.process = NodeProcess("eu", data_dir, self.port, *extra)
        self.url = self.process.url

    def __enter__(self) -> Node:
        self.process.start()
        assert self.process.proc is not None
        pin_process(self.process.proc.pid, SERVER_CORE)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.stop()


class BareServer:
    """``python -m benchmarks.bare_server`` in its own process, pinned to one core."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable,
            "-m",
            "benchmarks.bare_server",
            "--data",
            str(data_dir),
            "--listen",
            f"127.0.0.1:{self.port}",
            *extra,
        ]
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> BareServer:
        self.proc = start_listening(self.args, START_WAIT_S)
        pin_process(self.proc.pid, SERVER_CORE)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None:
            stop_process(self.proc, 15)


def disk_written(path: Path) -> int | None:
    """Bytes written so far to the block device holding ``path`` (Linux's
    ``/sys/dev/block/MAJ:MIN/stat``), or None where that is not available.

    The device's count, not the process's ``/proc/PID/io``: a kernel whose page cache
    holds large folios charges a process a whole folio (up to 2 MiB) for each 4 KiB page
    it dirties, while the device receives the page. The device's count also takes in
    its file system's journal, and whatever else writes to it meanwhile.
    """
    try:
        device = os.stat(path).st_dev
        with open(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/stat") as f:
            fields = f.read().split()
        return int(fields[6]) * 512  # sectors written; a sector here is always 512 bytes
    except (OSError, ValueError, IndexError):
        return None


def node_metric(url: str, name: str) -> float | None:
    """One figure of a node's ``/metrics`` (its first sample), or None if it has none."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return None if found is None else float(found.group(1))


def stop_process(proc: subprocess.Popen[str], wait_s: float) -> None:
    """SIGTERM (a server drains and exits), then SIGKILL if it is not gone in ``wait_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_listening(
    args: list[str], wait_s: float, stderr: IO[str] | None = None
) -> subprocess.Popen[str]:
    """Start a server process (from the repository's root) and return once it prints that
    it is listening; if it does not within ``wait_s``, stop it and raise."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=_root())
    assert proc.stdout is not None
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on" in line:
            return proc
        if not line and proc.poll() is not None:
            break
    stop_process(proc, 15)
    raise RuntimeError(f"{' '.join(args)} did not start")


def _root() -> str:
    return str(Path(__file__).resolve().parent.parent)


# -- seeding ----------------------------------------------------------------------


def user_fields(user_id: str) -> dict[str, str]:
    return {
        "name": f"Seed User {user_id}",
        "username": f"seed.{user_id}",
        "email": f"{user_id}@example.org",
    }


def seed_users(data_dir: Path, count: int) -> list[str]:
    """Create ``count`` users in a fresh node data directory, in-process (fast)."""
    ids = [f"s{i:06d}" for i in range(count)]

    async def create() -> None:
        replica = Replica.open(data_dir, "eu")
        try:
            replica.bind(asyncio.get_running_loop())
            for start in range(0, count, 2_000):  # bounded waves: the write queue is bounded
                await asyncio.gather(
                    *(
                        replica.write(commands.create("user", u, user_fields(u)), actor="seed")
                        for u in ids[start : start + 2_000]
                    )
                )
        finally:
            replica.close()

    asyncio.run(create())
    return ids


def load_bare_alike(node_url: str, ids: list[str], bare_dir: Path) -> None:
    """Load the bare server's LMDB at ``bare_dir`` with the users ``ids``, each document
    the JSON the node at ``node_url`` answers for it, and its email."""
    bodies = asyncio.run(fetch_all(node_url, [f"/users/{u}" for u in ids]))
    emails = (user_fields(u)["email"] for u in ids)
    bare_server.load(bare_dir, zip(ids, emails, bodies, strict=True))


async def fetch_all(
    base_url: str, paths: list[str], *, ok: tuple[int, ...] = (200,)
) -> list[bytes]:
    """GET every path (bounded concurrency); the response bodies, in order."""
    out: list[bytes] = [b""] * len(paths)
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            async with session.get(base_url + paths[i]) as response:
                if response.status not in ok:
                    response.raise_for_status()
                out[i] = await response.read()

        for start in range(0, len(paths), 256):
            await asyncio.gather(*(one(i) for i in range(start, min(len(paths), start + 256))))
    return out


# -- load -------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """What each request is: ``kind`` is "patch" (PATCH a name on a random path), "create"
    (POST /users with a fresh id) or "get" (GET a random path)."""

    kind: str
    paths: tuple[str, ...] = ()
    prefix: str = "b"  # ids created by "create" start with it: unique per run


@dataclass
class Load:
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    tool: str
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def run_load(url: str, scenario: Scenario, duration_s: float) -> Load:
    if shutil.which("wrk") and os.environ.get("BENCH_LOADGEN", "wrk") == "wrk":
        return _wrk(url, scenario, duration_s)
    return _python(url, scenario, duration_s)


_LUA = r"""
local paths = {%(paths)s}
local kind = "%(kind)s"
local prefix = "%(prefix)s"%(rerun)s
local n = 0
local headers = {["Content-Type"] = "application/json"}
math.randomseed(6)
request = function()
  n = n + 1
  if kind == "patch" then
    return wrk.format("PATCH", paths[math.random(#paths)], headers,
      '{"name": "Bench name ' .. n .. '"}')
  elseif kind == "create" then
    local id = prefix .. n
    return wrk.format("POST", "/users", headers,
      '{"id": "' .. id .. '", "name": "Bench ' .. id .. '", "username": "b.' .. id ..
      '", "email": "' .. id .. '@example.org"}')
  end
  return wrk.format("GET", paths[math.random(#paths)])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "status_errors": %%d, "connect": %%d, ' ..
    '"read": %%d, "write": %%d, "timeout": %%d, "p50_us": %%d, "p99_us": %%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_script(scenario: Scenario, *, rerun: bool = False) -> str:
    """The Lua script that makes ``wrk`` send ``scenario``'s requests (and print a
    ``WRKJSON`` line of its figures when done). ``rerun``: a script kept to be run again
    and again, whose created ids also carry the second ``wrk`` started, so that no run
    creates an id an earlier one did."""
    return _LUA % {
        "paths": ", ".join(json.dumps(p) for p in scenario.paths or ("/",)),
        "kind": scenario.kind,
        "prefix": scenario.prefix,
        "rerun": ' .. os.time() .. "-"' if rerun else "",
    }


def wrk_command(url: str, script: Path, duration_s: float) -> list[str]:
    """``wrk`` as the benchmarks run it: one thread, ``CONNECTIONS`` connections."""
    args = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(duration_s))}s"]
    return [*args, "--timeout", "10s", "-s", str(script), url]


def _wrk(url: str, scenario: Scenario, duration_s: float) -> Load:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(wrk_script(scenario))
    try:
        done = subprocess.run(
            wrk_command(url, Path(f.name), duration_s),
            capture_output=True,
            text=True,
            preexec_fn=load_affinity(),
            timeout=120,
        )
    finally:
        os.unlink(f.name)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {done.stdout}\n{done.stderr}")
    r = json.loads(line[len("WRKJSON ") :])
    errors = r["status_errors"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
    return Load(
        r["requests"],
        errors,
        r["duration_us"] / 1e6,
        r["p50_us"] / 1e3,
        r["p99_us"] / 1e3,
        "wrk",
        r,
    )


def _python(url: str, scenario: Scenario, duration_s: float) -> Load:
    spec = {
        "url": url,
        "kind": scenario.kind,
        "paths": list(scenario.paths),
        "prefix": scenario.prefix,
        "duration_s": duration_s,
        "connections": CONNECTIONS,
    }
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.loadgen"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        preexec_fn=load_affinity(),
        cwd=_root(),
        timeout=duration_s + 120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr}")
    r = json.loads(done.stdout)
    return Load(r["requests"], r["errors"], r["seconds"], r["p50_ms"], r["p99_ms"], "aiohttp", r)


def measure(
    url: str,
    scenario: Scenario,
    duration_s: float,
    warmup_s: float = 0,
    *,
    data_dir: Path | None = None,
) -> Load:
    """An optional warm-up run (discarded), then the measured one; failed requests raise.
    With the server's ``data_dir``, ``detail["disk_written"]`` is the bytes written to its
    device during the measured run, where Linux tells."""
    if warmup_s > 0:
        warm = Scenario(scenario.kind, scenario.paths, scenario.prefix + "w")
        run_load(url, warm, warmup_s)
    before = None if data_dir is None else disk_written(data_dir)
    load = run_load(url, scenario, duration_s)
    after = None if data_dir is None else disk_written(data_dir)
    if before is not None and after is not None:
        load.detail["disk_written"] = after - before
    if load.errors:
        raise RuntimeError(f"{load.errors} failed requests against {url}: {load.detail}")
    return load


def compare(
    urls: dict[str, str],
    scenarios: dict[str, Scenario],
    *,
    rounds: int,
    duration_s: float,
    warmup_s: float,
    data_dirs: dict[str, Path] | None = None,
) -> dict[tuple[str, str], Load]:
    """Every scenario against every server, the servers taking turns for ``rounds`` rounds
    (so a noisy neighbour hits both alike); per (server, scenario) the round with the most
    requests per second is kept. Scenario ids get a per-round prefix, so creates stay unique.
    With the servers' ``data_dirs``, each load tells the bytes written to their device
    (``measure``).
    """
    best: dict[tuple[str, str], Load] = {}
    for n in range(rounds):
        for scenario_name, scenario in scenarios.items():
            for side, url in urls.items():
                fresh = Scenario(scenario.kind, scenario.paths, f"{scenario.prefix}{side}{n}x")
                data_dir = None if data_dirs is None else data_dirs.get(side)
                warmup = warmup_s if n == 0 else 0
                load = measure(url, fresh, duration_s, warmup, data_dir=data_dir)
                key = (side, scenario_name)
                if key not in best or load.rps > best[key].rps:
                    best[key] = load
    return best
