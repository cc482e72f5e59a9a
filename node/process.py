"""A ``replica node`` child process: started, awaited until it serves, stopped cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

START_WAIT_S = 20.0
STOP_WAIT_S = 15.0


def free_port() -> int:
    """A port free on loopback now (another process may take it before it is bound)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def node_command(region: str, data_dir: Path, listen: str, *extra: str) -> list[str]:
    """The command line of a ``replica node`` run by this interpreter."""
    return [
        sys.executable,
        "-m",
        "node",
        "node",
        "--region",
        region,
        "--data",
        str(data_dir),
        "--listen",
        listen,
        *extra,
    ]


class NodeProcess:
    def __init__(
        self,
        region: str,
        data_dir: Path,
        port: int,
        *extra_args: str,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        prefix: Sequence[str] = (),
    ) -> None:
        """``prefix`` runs the node inside something, e.g. ``ip netns exec NAME``."""
        self.region, self.data_dir, self.port = region, data_dir, port
        self.url = f"http://{host}:{port}"
        self.args = [*prefix, *node_command(region, data_dir, f"{host}:{port}", *extra_args)]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.returncode: int | None = None

    def start(self) -> NodeProcess:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = self.data_dir.parent / f"{self.region}.log"
        with log.open("a") as stderr:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.args, stdout=subprocess.PIPE, stderr=stderr, text=True, env=self.env
            )
        deadline = time.monotonic() + START_WAIT_S
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if "listening on" in line:
                return self
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"node {self.region} did not start; see {log}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.returncode = self.proc.returncode
        return self.returncode

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
