"""``replica cluster`` as an operator runs it: flags it cannot use are refused before any
node starts, and no node outlives the command, whether a node fails to start or the
command itself is killed (found by a review: both left nodes on their ports and data)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.process import free_port
from tests.e2e.helpers import node_env

COMMAND_WAIT_S = 60.0
GONE_WAIT_S = 20.0  # a node drains and closes LMDB after its SIGTERM


def _cluster(*args: str) -> list[str]:
    return [sys.executable, "-m", "node", "cluster", *args]


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _wait_gone(ports: list[int], logs: list[Path]) -> None:
    """Every port closed and every node's log ending with its clean stop."""
    deadline = time.monotonic() + GONE_WAIT_S
    while time.monotonic() < deadline:
        if not any(_listening(p) for p in ports):
            break
        time.sleep(0.1)
    assert not any(_listening(p) for p in ports), f"a node still listens on one of {ports}"
    for log in logs:
        assert '"msg": "stopped"' in log.read_text().splitlines()[-1], log.read_text()


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--regions", "EU,us"], "region name must match"),
        (["--regions", "eu,eu"], "distinct region names"),
        (["--demo", "--regions", "eu,us"], "--demo walks the regions eu,us,ap"),
        (["--regions", "eu,us", "--port", "65535"], "must be 1 to 65534"),
    ],
)
def test_flags_it_cannot_use_are_refused_before_anything_starts(
    tmp_path: Path, flags: list[str], said: str
) -> None:
    refused = subprocess.run(
        _cluster(*flags, "--data", str(tmp_path / "c")),
        capture_output=True,
        text=True,
        timeout=COMMAND_WAIT_S,
        env=node_env(),
    )
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("replica: error: "), refused.stderr
    assert said in refused.stderr, refused.stderr
    assert not (tmp_path / "c").exists()


def test_a_node_that_cannot_start_stops_the_ones_that_did(tmp_path: Path) -> None:
    with socket.socket() as taken:  # us's port, held here
        while True:
            first = free_port()
            try:
                taken.bind(("127.0.0.1", first + 1))
                break
            except OSError:
                continue
        taken.listen()
        failed = subprocess.run(
            _cluster("--regions", "eu,us", "--port", str(first), "--data", str(tmp_path)),
            capture_output=True,
            text=True,
            timeout=COMMAND_WAIT_S,
            env=node_env(),
        )
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr, failed.stderr
    assert "node us did not start" in failed.stderr, failed.stderr
    assert "cannot listen" in failed.stderr, failed.stderr  # what us itself said
    _wait_gone([first], [tmp_path / "eu.log"])


def test_a_killed_cluster_command_takes_its_nodes_down(tmp_path: Path) -> None:
    """kill -9 of the command (no handler can run) still stops every node cleanly. The
    shell's API token and config file are not its nodes' (an exported token failed their
    readiness checks: a review); its other REPLICA_ settings tune them."""
    config = tmp_path / "prod.toml"
    config.write_text('api_token = "from-the-config"\n')
    shell = {
        "REPLICA_API_TOKEN": "tok12345",
        "REPLICA_CONFIG": str(config),
        "REPLICA_GOSSIP_INTERVAL_MS": "777",
    }
    command = subprocess.Popen(
        _cluster("--regions", "eu,us", "--data", str(tmp_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**node_env(), **shell},
    )
    try:
        assert command.stdout is not None
        ports: list[int] = []
        deadline = time.monotonic() + COMMAND_WAIT_S
        while time.monotonic() < deadline:
            line = command.stdout.readline()
            if not line or "stops the cluster" in line:
                break
            found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if found:
                ports.append(int(found.group(1)))
        assert len(ports) == 2, f"the command did not say where its nodes listen: {ports}"
        assert all(_listening(p) for p in ports)
        assert '"gossip_interval_ms": 777' in (tmp_path / "eu.log").read_text()
        command.send_signal(signal.SIGKILL)
        command.wait(COMMAND_WAIT_S)
        _wait_gone(ports, [tmp_path / "eu.log", tmp_path / "us.log"])
    finally:
        command.kill()
        command.wait()
        if command.stdout is not None:
            command.stdout.close()
