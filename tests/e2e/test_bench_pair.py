"""``python -m benchmarks.pair``: a node and the bare server seeded alike, served by the
commands it prints, answer the reads of its wrk scripts with the same JSON."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

from benchmarks.httpbench import free_port, start_listening, stop_process

USERS = 20


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        body: bytes = reply.read()
        return body


def _paths(script: Path) -> list[str]:
    """The paths a wrk script picks among (its ``local paths = {...}`` line)."""
    line = next(x for x in script.read_text().splitlines() if x.startswith("local paths"))
    return re.findall(r'"([^"]*)"', line)


def test_both_servers_serve_the_same_users_to_the_scripts_paths(tmp_path: Path) -> None:
    base = tmp_path / "pair"
    ports = {"node": free_port(), "bare": free_port()}
    args = [sys.executable, "-m", "benchmarks.pair", str(base), "--users", str(USERS)]
    args += ["--node-port", str(ports["node"]), "--bare-port", str(ports["bare"])]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)
    assert f"seeded {USERS} users" in done.stdout

    lines = done.stdout.splitlines()
    serve = {name: shlex.split(lines[lines.index(f"# {name}") + 1]) for name in ports}
    loads = [shlex.split(line) for line in lines if " wrk " in line]
    assert len(loads) == 2 * 4  # reads by id and by email, PATCH, POST: against each
    scripts = {Path(load[load.index("-s") + 1]).stem: load[load.index("-s") + 1] for load in loads}
    assert set(scripts) == {"get-id", "get-email", "patch", "post"}
    by_id, by_email = (_paths(Path(scripts[name])) for name in ("get-id", "get-email"))
    assert len(by_id) == len(by_email) == USERS
    assert 'local prefix = "w" .. os.time()' in Path(scripts["post"]).read_text()  # reruns

    bodies: dict[str, list[bytes]] = {}
    for name, command in serve.items():
        assert command[:3] == ["taskset", "-c", "0"]  # the server on one core, load on the other
        proc = start_listening(command, 30)
        try:
            url = f"http://127.0.0.1:{ports[name]}"
            bodies[name] = [_get(url + path) for path in (by_id[0], by_id[-1], by_email[3])]
        finally:
            stop_process(proc, 15)
    assert bodies["node"] == bodies["bare"]
    assert b'"id": "s000003"' in bodies["node"][2]


def test_a_directory_with_data_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kept").write_text("mine")
    args = [sys.executable, "-m", "benchmarks.pair", str(tmp_path), "--users", "1"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "is not empty" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
