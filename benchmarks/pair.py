"""A node and the bare server side by side, seeded alike, for load from a tool of your own.

    python -m benchmarks.pair DIR [--users 5000] [--node-port 8701] [--bare-port 8702]

Seeds ``DIR/node`` (a replica data directory) and ``DIR/bare`` (the bare server's LMDB)
with the same users, the bare server's documents being the node's own JSON for them, as
the HTTP benchmarks do; writes the ``wrk`` scripts those benchmarks send (random paths
among the users); and prints the commands that serve each, pinned to one core, and load
it from the other. Run one server at a time, or both with one of them loaded at a time.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from benchmarks.httpbench import (
    LOAD_CORE,
    SERVER_CORE,
    Node,
    Scenario,
    load_bare_alike,
    seed_users,
    user_fields,
    wrk_command,
    wrk_script,
)
from node.process import node_command

USERS_DEFAULT = 5_000  # as benchmarks.http_reads
LOAD_S = 10


def scenarios(ids: list[str]) -> dict[str, Scenario]:
    """What each script sends, by its name: the HTTP benchmarks' reads and writes."""
    return {
        "get-id": Scenario("get", tuple(f"/users/{u}" for u in ids)),
        "get-email": Scenario("get", tuple(f"/users?email={user_fields(u)['email']}" for u in ids)),
        "patch": Scenario("patch", tuple(f"/users/{u}" for u in ids)),
        "post": Scenario("create", prefix="w"),
    }


def prepare(base: Path, users: int) -> dict[str, Path]:
    """Seed both servers' data under ``base`` and write the scripts; their paths by name."""
    if base.exists() and any(base.iterdir()):
        raise SystemExit(f"{base} is not empty: give a new directory")
    ids = seed_users(base / "node", users)
    with Node(base / "node") as node:
        load_bare_alike(node.url, ids, base / "bare")
    scripts = {}
    for name, scenario in scenarios(ids).items():
        scripts[name] = base / f"{name}.lua"
        scripts[name].write_text(wrk_script(scenario, rerun=True))
    return scripts


def commands(base: Path, scripts: dict[str, Path], node_port: int, bare_port: int) -> str:
    """The shell lines that serve each server and load it."""

    def line(core: int, args: list[str]) -> str:
        return shlex.join(["taskset", "-c", str(core), *args])

    servers = {
        "node": (
            node_port,
            node_command("eu", base / "node", f"127.0.0.1:{node_port}"),
        ),
        "bare": (
            bare_port,
            [
                sys.executable,
                "-m",
                "benchmarks.bare_server",
                "--data",
                str(base / "bare"),
                "--listen",
                f"127.0.0.1:{bare_port}",
            ],
        ),
    }
    out = []
    for name, (port, serve) in servers.items():
        out += [f"# {name}", line(SERVER_CORE, serve)]
        for script in scripts.values():
            out.append(line(LOAD_CORE, wrk_command(f"http://127.0.0.1:{port}", script, LOAD_S)))
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pair", description=__doc__)
    parser.add_argument("dir", type=Path, help="a new directory for both servers' data")
    parser.add_argument("--users", type=int, default=USERS_DEFAULT)
    parser.add_argument("--node-port", type=int, default=8701)
    parser.add_argument("--bare-port", type=int, default=8702)
    args = parser.parse_args(argv)
    base = args.dir.resolve()
    scripts = prepare(base, args.users)
    print(f"seeded {args.users} users in {base / 'node'} and {base / 'bare'}\n")
    print(commands(base, scripts, args.node_port, args.bare_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
