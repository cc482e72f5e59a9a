"""Real ``replica node`` processes on loopback, and a small synchronous HTTP client.

A node is started as ``python -m node node --region R --data DIR --listen 127.0.0.1:PORT``
and is ready when it prints ``replica <id> listening on <url>`` on stdout. Its stderr
(JSON log lines) goes to a file, shown in every failure about it.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from node.process import free_port, node_command

READY_TIMEOUT_S = 20.0  # from spawn to the "listening" line
EXIT_TIMEOUT_S = 20.0  # from SIGTERM to exit
HTTP_TIMEOUT_S = 30.0
PORT_ATTEMPTS = 3  # another process may take the port between probe and bind


def node_env() -> dict[str, str]:
    """The test's environment without REPLICA_* settings, so only the flags count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLICA_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    url: str
    region: str
    data_dir: Path
    stderr_path: Path
    ready_line: str = ""
    sigtermed: bool = False

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 0

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sigterm(self) -> None:
        """Ask the node to drain and stop, once (a second SIGTERM would be a different test)."""
        if not self.sigtermed and self.alive():
            self.sigtermed = True
            self.proc.send_signal(signal.SIGTERM)

    def terminate(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        """SIGTERM (unless sent already) and wait; not exiting in time fails the test."""
        self.sigterm()
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"node did not exit within {timeout_s} s of SIGTERM\n{self.stderr()}"
            ) from None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait(EXIT_TIMEOUT_S)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        return call(self.url, method, path, body, headers)


@dataclass
class Nodes:
    """Starts nodes under one directory and makes sure none outlives the test."""

    root: Path
    started: list[Node] = field(default_factory=list)

    def data_dir(self, name: str) -> Path:
        return self.root / name

    def start(self, region: str = "eu", data: str | None = None, *extra: str) -> Node:
        data_dir = self.data_dir(data or region)
        for attempt in range(PORT_ATTEMPTS):
            port = free_port()
            log = self.root / f"{data or region}-{len(self.started)}-{attempt}.stderr"
            with log.open("wb") as stderr:
                proc = subprocess.Popen(
                    node_command(region, data_dir, f"127.0.0.1:{port}", *extra),
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    stdin=subprocess.DEVNULL,
                    env=node_env(),
                )
            node = Node(proc, f"http://127.0.0.1:{port}", region, data_dir, log)
            self.started.append(node)
            line = _wait_for_ready(proc)
            if line is not None:
                node.ready_line = line
                return node
            node.kill()
            if "cannot listen" not in node.stderr():
                break
        raise AssertionError(
            f"node {region} on {data_dir} did not print 'listening' within {READY_TIMEOUT_S} s"
            f" (exit code {node.proc.returncode}); stderr:\n{node.stderr()}"
        )

    def run(
        self, region: str, data: str, listen: str, *extra: str
    ) -> subprocess.CompletedProcess[str]:
        """A node process expected to refuse to start: its exit code and output."""
        return subprocess.run(
            node_command(region, self.data_dir(data), listen, *extra),
            capture_output=True,
            text=True,
            timeout=READY_TIMEOUT_S,
            env=node_env(),
            stdin=subprocess.DEVNULL,
        )

    def stop_all(self) -> None:
        for node in self.started:
            try:
                node.kill()
            finally:
                if node.proc.stdout is not None:
                    node.proc.stdout.close()


def _wait_for_ready(proc: subprocess.Popen[bytes]) -> str | None:
    """The "listening" line, or None if the process ended or stayed silent too long."""
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        while True:
            line = lines.get(timeout=READY_TIMEOUT_S)
            if line is None:
                return None
            if " listening on " in line:
                return line
    except queue.Empty:
        return None


def _read_lines(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    try:
        for raw in stream:
            lines.put(raw.decode(errors="replace").rstrip("\n"))
    except (OSError, ValueError):  # closed under us at the end of the test
        pass
    lines.put(None)


# -- a synchronous JSON client ------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]  # lower-cased names
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def call(
    base_url: str,
    method: str,
    path: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(
        parts.hostname or "", parts.port, timeout=HTTP_TIMEOUT_S
    )
    sent = dict(headers or {})
    data = None
    if isinstance(body, bytes):  # as it is (a replication request's msgpack)
        data = body
    elif body is not None:
        data = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    try:
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        text = response.read().decode(errors="replace")
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, text)
    finally:
        connection.close()
